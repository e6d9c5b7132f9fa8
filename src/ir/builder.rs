//! Appending nodes to a [`StepIr`] with domains and widths inferred and constants shared.

use super::{Binary, Buffer, Matrix, MatrixId, Node, Op, RuntimeScalar, StepIr, Unary, ValueId};
use crate::shape::{Domain, Layout};
use std::collections::HashMap;

/// Builds a [`StepIr`] node by node. Operations infer their domain (the join of the operands')
/// and width; constants and runtime scalars are created once and shared.
pub struct IrBuilder {
    ir: StepIr,
    consts: HashMap<u64, ValueId>,
    scalars: HashMap<RuntimeScalar, ValueId>,
}

impl IrBuilder {
    /// An empty IR for `layout`.
    pub fn new(layout: Layout, lopt_fingerprint: String) -> Self {
        IrBuilder {
            ir: StepIr {
                layout,
                nodes: Vec::new(),
                matrices: Vec::new(),
                lopt_fingerprint,
            },
            consts: HashMap::new(),
            scalars: HashMap::new(),
        }
    }

    /// The layout being built for.
    pub fn layout(&self) -> &Layout {
        &self.ir.layout
    }

    /// The finished IR (not yet verified).
    pub fn finish(self) -> StepIr {
        self.ir
    }

    /// Domain of a value.
    pub fn domain(&self, v: ValueId) -> Domain {
        self.ir.node(v).domain
    }

    /// Width of a value.
    pub fn width(&self, v: ValueId) -> u32 {
        self.ir.node(v).width
    }

    /// Appends a node as it is.
    pub fn push(&mut self, op: Op, domain: Domain, width: u32) -> ValueId {
        let id = ValueId(self.ir.nodes.len() as u32);
        self.ir.nodes.push(Node {
            op,
            domain,
            width,
            note: None,
        });
        id
    }

    /// Attaches a note to a value (shown in the text form and generated code), and returns it.
    pub fn note(&mut self, v: ValueId, note: impl Into<String>) -> ValueId {
        self.ir.nodes[v.index()].note = Some(note.into());
        v
    }

    /// Adds a constant matrix.
    pub fn matrix(&mut self, matrix: Matrix) -> MatrixId {
        self.ir.matrices.push(matrix);
        MatrixId(self.ir.matrices.len() as u32 - 1)
    }

    /// Lane `lane` of a buffer.
    pub fn load(&mut self, buffer: Buffer, lane: u32) -> ValueId {
        self.push(Op::Load { buffer, lane }, buffer.domain(), 1)
    }

    /// A runtime scalar.
    pub fn scalar(&mut self, s: RuntimeScalar) -> ValueId {
        if let Some(&v) = self.scalars.get(&s) {
            return v;
        }
        let v = self.push(Op::Scalar(s), Domain::Step, 1);
        self.scalars.insert(s, v);
        v
    }

    /// A constant.
    pub fn constant(&mut self, value: f64) -> ValueId {
        if let Some(&v) = self.consts.get(&value.to_bits()) {
            return v;
        }
        let v = self.push(Op::Const(value), Domain::Step, 1);
        self.consts.insert(value.to_bits(), v);
        v
    }

    /// An f32 constant, widened exactly (for normative f32 values such as the decays).
    pub fn constant_f32(&mut self, value: f32) -> ValueId {
        self.constant(value as f64)
    }

    /// Lane-wise one-operand operation.
    pub fn unary(&mut self, op: Unary, a: ValueId) -> ValueId {
        let (d, w) = (self.domain(a), self.width(a));
        self.push(Op::Unary(op, a), d, w)
    }

    /// Lane-wise two-operand operation on the join of the operands' domains.
    pub fn binary(&mut self, op: Binary, a: ValueId, b: ValueId) -> ValueId {
        let d = self.domain(a).join(self.domain(b));
        let w = self.width(a).max(self.width(b));
        self.push(Op::Binary(op, a, b), d, w)
    }

    /// `a + b`
    pub fn add(&mut self, a: ValueId, b: ValueId) -> ValueId {
        self.binary(Binary::Add, a, b)
    }

    /// `a - b`
    pub fn sub(&mut self, a: ValueId, b: ValueId) -> ValueId {
        self.binary(Binary::Sub, a, b)
    }

    /// `a * b`
    pub fn mul(&mut self, a: ValueId, b: ValueId) -> ValueId {
        self.binary(Binary::Mul, a, b)
    }

    /// `a / b`
    pub fn div(&mut self, a: ValueId, b: ValueId) -> ValueId {
        self.binary(Binary::Div, a, b)
    }

    /// `max(a, b)`
    pub fn max(&mut self, a: ValueId, b: ValueId) -> ValueId {
        self.binary(Binary::Max, a, b)
    }

    /// `a + c` for a constant `c`.
    pub fn add_const(&mut self, a: ValueId, c: f64) -> ValueId {
        let c = self.constant(c);
        self.add(a, c)
    }

    /// `max(a, c)` for a constant `c`.
    pub fn max_const(&mut self, a: ValueId, c: f64) -> ValueId {
        let c = self.constant(c);
        self.max(a, c)
    }

    /// `1 / sqrt(x)`
    pub fn rsqrt(&mut self, a: ValueId) -> ValueId {
        self.unary(Unary::Rsqrt, a)
    }

    /// Mean of `a` down to the smaller domain `to`.
    pub fn mean(&mut self, a: ValueId, to: Domain) -> ValueId {
        let w = self.width(a);
        self.push(Op::Mean(a), to, w)
    }

    /// A vector of width-1 values, on the join of their domains.
    pub fn pack(&mut self, xs: Vec<ValueId>) -> ValueId {
        let d = xs
            .iter()
            .map(|&x| self.domain(x))
            .reduce(Domain::join)
            .unwrap_or(Domain::Step);
        let w = xs.len() as u32;
        self.push(Op::Pack(xs), d, w)
    }

    /// `W x + b`.
    pub fn dense(&mut self, matrix: MatrixId, x: ValueId) -> ValueId {
        let d = self.domain(x);
        let rows = self.ir.matrix(matrix).rows as u32;
        self.push(Op::Dense { matrix, x }, d, rows)
    }

    /// One lane of a vector.
    pub fn lane(&mut self, x: ValueId, lane: u32) -> ValueId {
        let d = self.domain(x);
        self.push(Op::Lane { x, lane }, d, 1)
    }

    /// Writes `value` into lane `lane` of `buffer`.
    pub fn store(&mut self, buffer: Buffer, lane: u32, value: ValueId) {
        self.push(
            Op::Store {
                buffer,
                lane,
                value,
            },
            buffer.domain(),
            0,
        );
    }
}
