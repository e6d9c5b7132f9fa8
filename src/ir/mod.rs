//! The step IR: one μLO optimizer step for one concrete tensor shape.
//!
//! A [`StepIr`] is an arena of [`Node`]s in topological order. Every node lives on a
//! [`Domain`] (the whole tensor, the row/column accumulator spaces, or once per step) and has
//! a width (1 for a scalar per point, `n` for a vector such as a hidden layer). An operand on
//! a smaller domain is broadcast along the axes it lacks. The MLP's weights are constant
//! [`Matrix`]es of the IR; `lr`, `weight_decay` and the step counter are runtime scalars.
//!
//! Backends render this IR; none of them knows the μLO math. The math is written once, in
//! [`crate::frontend`].

mod builder;
mod text;
mod verify;

pub use builder::IrBuilder;
pub use verify::verify;

use crate::shape::{Domain, Layout};
use std::fmt;

/// Identifies a node (and the value it computes); prints as `v7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

impl ValueId {
    /// Index into [`StepIr::nodes`].
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// Identifies a constant matrix; prints as `w3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MatrixId(pub u32);

impl fmt::Display for MatrixId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// The tensors a step reads and writes. State buffers are stored decay-major (`[lanes, *domain]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Buffer {
    /// The parameter P (read, and written with the update).
    Param,
    /// The gradient G (read only).
    Grad,
    /// Momenta M_1..M_3: `[3, *S]`.
    Mom,
    /// Second moment V: `[*S]`.
    Rms,
    /// Row accumulators R_1..R_3 (factored): `[3, *(S without d0)]`.
    FacRow,
    /// Column accumulators C_1..C_3 (factored): `[3, *(S without d1)]`.
    FacCol,
    /// Full accumulators F_1..F_3 (unfactored): `[3, *S]`.
    FacV,
}

impl Buffer {
    /// Every buffer, in the canonical argument order of the generated programs.
    pub const ALL: [Buffer; 7] = [
        Buffer::Param,
        Buffer::Grad,
        Buffer::Mom,
        Buffer::Rms,
        Buffer::FacRow,
        Buffer::FacCol,
        Buffer::FacV,
    ];

    /// The canonical name (ONNX input names, manifest keys, checkpoint keys).
    pub fn name(self) -> &'static str {
        match self {
            Buffer::Param => "param",
            Buffer::Grad => "grad",
            Buffer::Mom => "mom",
            Buffer::Rms => "rms",
            Buffer::FacRow => "fac_row",
            Buffer::FacCol => "fac_col",
            Buffer::FacV => "fac_v",
        }
    }

    /// Number of lanes (decays) stacked in the leading axis; 1 means no leading axis.
    pub fn lanes(self) -> usize {
        match self {
            Buffer::Mom | Buffer::FacRow | Buffer::FacCol | Buffer::FacV => 3,
            Buffer::Param | Buffer::Grad | Buffer::Rms => 1,
        }
    }

    /// The domain one lane of the buffer spans.
    pub fn domain(self) -> Domain {
        match self {
            Buffer::FacRow => Domain::Row,
            Buffer::FacCol => Domain::Col,
            _ => Domain::Elem,
        }
    }

    /// Whether the buffer is optimizer state (kept between steps).
    pub fn is_state(self) -> bool {
        !matches!(self, Buffer::Param | Buffer::Grad)
    }

    /// The buffers a tensor of this layout has.
    pub fn for_layout(layout: &Layout) -> Vec<Buffer> {
        Buffer::ALL
            .into_iter()
            .filter(|b| match b {
                Buffer::FacRow | Buffer::FacCol => layout.factored().is_some(),
                Buffer::FacV => layout.factored().is_none(),
                _ => true,
            })
            .collect()
    }

    /// The state buffers a tensor of this layout has.
    pub fn state_for_layout(layout: &Layout) -> Vec<Buffer> {
        Self::for_layout(layout)
            .into_iter()
            .filter(|b| b.is_state())
            .collect()
    }

    /// Number of f32 values the buffer holds for `layout`.
    pub fn len(self, layout: &Layout) -> usize {
        self.lanes() * layout.domain_len(self.domain())
    }

    /// The buffer's shape for `layout`: `[lanes, *domain shape]`, or the domain shape alone when
    /// it has one lane.
    pub fn shape(self, layout: &Layout) -> Vec<usize> {
        let mut shape = layout.domain_shape(self.domain());
        if self.lanes() > 1 {
            shape.insert(0, self.lanes());
        }
        shape
    }
}

impl fmt::Display for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Scalars supplied at run time, the same for every element of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuntimeScalar {
    /// The learning rate (after any μP scaling).
    Lr,
    /// The weight decay.
    WeightDecay,
    /// The step counter t (steps taken before this one), as a float.
    StepCount,
}

impl RuntimeScalar {
    /// Every runtime scalar, in argument order.
    pub const ALL: [RuntimeScalar; 3] = [
        RuntimeScalar::Lr,
        RuntimeScalar::WeightDecay,
        RuntimeScalar::StepCount,
    ];

    /// Canonical name.
    pub fn name(self) -> &'static str {
        match self {
            RuntimeScalar::Lr => "lr",
            RuntimeScalar::WeightDecay => "weight_decay",
            RuntimeScalar::StepCount => "step",
        }
    }
}

/// One-operand operations (lane-wise on vectors).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unary {
    /// `-x`
    Neg,
    /// `x * x`
    Square,
    /// `1 / sqrt(x)`
    Rsqrt,
    /// `e^x`
    Exp,
    /// `tanh(x)`
    Tanh,
    /// `max(x, 0)`
    Relu,
    /// PyTorch's `nan_to_num` in f32: NaN → 0, +∞ → f32::MAX, −∞ → −f32::MAX (ELO's gradient).
    NanToNum,
}

impl Unary {
    /// Name in the text form.
    pub fn name(self) -> &'static str {
        match self {
            Unary::Neg => "neg",
            Unary::Square => "square",
            Unary::Rsqrt => "rsqrt",
            Unary::Exp => "exp",
            Unary::Tanh => "tanh",
            Unary::Relu => "relu",
            Unary::NanToNum => "nan_to_num",
        }
    }
}

/// Two-operand operations (lane-wise on vectors of equal width).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Binary {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a * b`
    Mul,
    /// `a / b`
    Div,
    /// `max(a, b)`
    Max,
}

impl Binary {
    /// Name in the text form.
    pub fn name(self) -> &'static str {
        match self {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Div => "div",
            Binary::Max => "max",
        }
    }
}

/// What a node computes.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Reads lane `lane` of a buffer, at the node's domain (the buffer's own).
    Load {
        /// The buffer.
        buffer: Buffer,
        /// Which lane (0 for single-lane buffers).
        lane: u32,
    },
    /// A runtime scalar (domain `Step`).
    Scalar(RuntimeScalar),
    /// A constant (domain `Step`). Stored as f64; an f32 backend rounds it once.
    Const(f64),
    /// Lane-wise one-operand operation.
    Unary(Unary, ValueId),
    /// Lane-wise two-operand operation; operands are broadcast to the node's domain.
    Binary(Binary, ValueId, ValueId),
    /// Mean of the operand over the axes its domain has and the node's domain lacks.
    Mean(ValueId),
    /// A vector whose lanes are the given width-1 values (broadcast to the node's domain).
    Pack(Vec<ValueId>),
    /// `W x + b` with a constant matrix; `x`'s width is the matrix's column count.
    Dense {
        /// The weights.
        matrix: MatrixId,
        /// The input vector.
        x: ValueId,
    },
    /// One lane of a vector.
    Lane {
        /// The vector.
        x: ValueId,
        /// Which lane.
        lane: u32,
    },
    /// Writes a width-1 value into lane `lane` of a buffer (no value; width 0).
    Store {
        /// The buffer.
        buffer: Buffer,
        /// Which lane.
        lane: u32,
        /// What is written.
        value: ValueId,
    },
}

impl Op {
    /// The operands, in order.
    pub fn operands(&self) -> Vec<ValueId> {
        match self {
            Op::Load { .. } | Op::Scalar(_) | Op::Const(_) => Vec::new(),
            Op::Unary(_, a) | Op::Mean(a) => vec![*a],
            Op::Binary(_, a, b) => vec![*a, *b],
            Op::Pack(xs) => xs.clone(),
            Op::Dense { x, .. } | Op::Lane { x, .. } => vec![*x],
            Op::Store { value, .. } => vec![*value],
        }
    }
}

/// One node of the IR.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// What it computes.
    pub op: Op,
    /// Where it lives.
    pub domain: Domain,
    /// Number of lanes (0 for stores).
    pub width: u32,
    /// What the value means, for the text form and generated code (e.g. `feature 13`).
    pub note: Option<String>,
}

/// A constant dense layer: `[rows, cols]` row-major weights and an optional bias.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    /// Output count.
    pub rows: usize,
    /// Input count.
    pub cols: usize,
    /// Row-major `[rows, cols]`.
    pub weight: Vec<f32>,
    /// `[rows]`, if any.
    pub bias: Option<Vec<f32>>,
    /// What the matrix is (e.g. `layer 0, columns 0..28`).
    pub label: String,
}

impl Matrix {
    /// Weight of output `r` from input `c`.
    pub fn w(&self, r: usize, c: usize) -> f32 {
        self.weight[r * self.cols + c]
    }
}

/// One optimizer step for one tensor layout.
#[derive(Clone, Debug, PartialEq)]
pub struct StepIr {
    /// The tensor the step is for.
    pub layout: Layout,
    /// Nodes in topological order (every operand precedes its user).
    pub nodes: Vec<Node>,
    /// The constant matrices the `Dense` nodes use.
    pub matrices: Vec<Matrix>,
    /// Fingerprint of the learned optimizer the IR was built from.
    pub lopt_fingerprint: String,
}

impl StepIr {
    /// The node of a value.
    pub fn node(&self, id: ValueId) -> &Node {
        &self.nodes[id.index()]
    }

    /// The matrix of an id.
    pub fn matrix(&self, id: MatrixId) -> &Matrix {
        &self.matrices[id.0 as usize]
    }

    /// The buffers this step reads or writes.
    pub fn buffers(&self) -> Vec<Buffer> {
        Buffer::for_layout(&self.layout)
    }

    /// Ids of all nodes, in order.
    pub fn ids(&self) -> impl Iterator<Item = ValueId> {
        (0..self.nodes.len() as u32).map(ValueId)
    }

    /// For each node, the index of the last node that uses it (itself if none).
    pub fn last_uses(&self) -> Vec<usize> {
        let mut last: Vec<usize> = (0..self.nodes.len()).collect();
        for (i, node) in self.nodes.iter().enumerate() {
            for operand in node.op.operands() {
                last[operand.index()] = i;
            }
        }
        last
    }

    /// The stable text form (what `mulo-compile --target ir` prints).
    pub fn to_text(&self) -> String {
        text::render(self)
    }
}
