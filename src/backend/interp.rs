//! The reference interpreter: executes the IR node by node on the CPU, in f32 or f64.
//!
//! It is the executable definition every other backend is checked against, so it is written
//! for obviousness, not speed: every value is materialized over its whole domain. Means are
//! accumulated in f64 (SPEC.md §3.4: a running f32 sum over 10^5 elements costs a fifth of
//! the golden tolerance).

use super::{check_step_args, Hyper, TensorStepper};
use crate::error::Result;
use crate::ir::{Binary, Buffer, Op, RuntimeScalar, StepIr, Unary, ValueId};
use crate::shape::{Domain, Layout};
use crate::state::TensorState;
use std::collections::HashMap;
use std::sync::Arc;

/// The float types the interpreter runs in.
pub trait Real:
    Copy
    + Default
    + PartialOrd
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    /// Rounds an f64 to this type.
    fn from_f64(x: f64) -> Self;
    /// Widens to f64.
    fn to_f64(self) -> f64;
    /// √x
    fn sqrt(self) -> Self;
    /// eˣ
    fn exp(self) -> Self;
    /// tanh x
    fn tanh(self) -> Self;
    /// Whether the value is NaN.
    fn is_nan(self) -> bool;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// One lane-wise unary op, as the interpreter computes it.
pub(crate) fn unary<T: Real>(op: Unary, x: T) -> T {
    let zero = T::from_f64(0.0);
    let one = T::from_f64(1.0);
    match op {
        Unary::Neg => -x,
        Unary::Square => x * x,
        Unary::Rsqrt => one / x.sqrt(),
        Unary::Exp => x.exp(),
        Unary::Tanh => x.tanh(),
        // NaN propagates, as in PyTorch.
        Unary::Relu => {
            if x < zero {
                zero
            } else {
                x
            }
        }
        // The bounds are f32's even in f64: the gradient it sanitizes is an f32 tensor.
        Unary::NanToNum => {
            let big = T::from_f64(f32::MAX as f64);
            if x.is_nan() {
                zero
            } else if x > big {
                big
            } else if x < -big {
                -big
            } else {
                x
            }
        }
    }
}

/// One lane-wise binary op, as the interpreter computes it.
pub(crate) fn binary<T: Real>(op: Binary, a: T, b: T) -> T {
    match op {
        Binary::Add => a + b,
        Binary::Sub => a - b,
        Binary::Mul => a * b,
        Binary::Div => a / b,
        // NaN in either operand propagates, as torch.maximum / clamp do.
        Binary::Max => {
            if a.is_nan() || a >= b {
                a
            } else {
                b
            }
        }
    }
}

/// Index maps for broadcasting, one per (big, small) domain pair in use.
#[derive(Debug)]
pub(crate) struct Broadcasts {
    maps: HashMap<(Domain, Domain), Vec<usize>>,
}

impl Broadcasts {
    /// The maps from every domain `big` that `keep(big)` accepts to each smaller domain of the
    /// layout.
    pub(crate) fn new(layout: &Layout, keep: impl Fn(Domain) -> bool) -> Self {
        let mut maps = HashMap::new();
        for &big in &layout.domains() {
            if !keep(big) {
                continue;
            }
            for &small in &layout.domains() {
                if big != small && big.contains(small) {
                    maps.insert((big, small), layout.broadcast_index(big, small));
                }
            }
        }
        Broadcasts { maps }
    }

    /// The maps the nodes of `ir` use (operand or mean domains differing from the node's).
    fn for_ir(ir: &StepIr) -> Self {
        let layout = &ir.layout;
        let mut maps = HashMap::new();
        for node in &ir.nodes {
            for o in node.op.operands() {
                let od = ir.node(o).domain;
                let pair = if matches!(node.op, Op::Mean(_)) {
                    (od, node.domain)
                } else {
                    (node.domain, od)
                };
                if pair.0 != pair.1 && pair.1 != Domain::Step {
                    maps.entry(pair)
                        .or_insert_with(|| layout.broadcast_index(pair.0, pair.1));
                }
            }
        }
        Broadcasts { maps }
    }

    /// `f(p)` = index in `small` of point `p` of `big`; `None` means the identity (or `small`
    /// is the one-point step domain, see [`at`]).
    pub(crate) fn map(&self, big: Domain, small: Domain) -> Option<&[usize]> {
        if big == small || small == Domain::Step {
            return None;
        }
        Some(&self.maps[&(big, small)])
    }
}

/// Point `p` of a domain mapped into a smaller one by `map` (see [`Broadcasts::map`]);
/// `small_n` is the smaller domain's length (1 for the step domain, which has no map).
pub(crate) fn at(map: Option<&[usize]>, p: usize, small_n: usize) -> usize {
    match map {
        None if small_n == 1 => 0,
        None => p,
        Some(m) => m[p],
    }
}

/// What [`eval_node`] reads a node's inputs from.
pub(crate) trait NodeInputs<T> {
    /// The value of an earlier node (`[points][width]`).
    fn value(&self, v: ValueId) -> &[T];
    /// A buffer's data (every lane, lane-major).
    fn buffer(&self, b: Buffer) -> &[T];
    /// Broadcast maps between the layout's domains.
    fn broadcasts(&self) -> &Broadcasts;
}

/// The value of node `i` of `ir` over its whole domain (`[points][width]`): the op semantics
/// that every backend is checked against. `None` for a store, which writes instead (the
/// caller performs it). `step` is the step counter the step runs with.
pub(crate) fn eval_node<T: Real>(
    ir: &StepIr,
    i: usize,
    inputs: &impl NodeInputs<T>,
    step: u64,
    hyper: &Hyper,
) -> Option<Vec<T>> {
    let layout = &ir.layout;
    let node = &ir.nodes[i];
    let n = layout.domain_len(node.domain);
    let w = node.width as usize;
    let bc = inputs.broadcasts();
    let get = |v: ValueId| inputs.value(v);
    let map = |x: ValueId| {
        let d = ir.node(x).domain;
        (bc.map(node.domain, d), layout.domain_len(d))
    };
    Some(match &node.op {
        Op::Load { buffer, lane } => {
            let start = *lane as usize * n;
            inputs.buffer(*buffer)[start..start + n].to_vec()
        }
        Op::Scalar(s) => vec![match s {
            RuntimeScalar::Lr => T::from_f64(hyper.lr as f64),
            RuntimeScalar::WeightDecay => T::from_f64(hyper.weight_decay as f64),
            RuntimeScalar::StepCount => T::from_f64(step as f64),
        }],
        Op::Const(c) => vec![T::from_f64(*c)],
        Op::Unary(op, a) => get(*a).iter().map(|&x| unary(*op, x)).collect(),
        Op::Binary(op, a, b) => {
            let ((ma, na), (mb, nb)) = (map(*a), map(*b));
            let (va, vb) = (get(*a), get(*b));
            let mut out = Vec::with_capacity(n * w);
            for p in 0..n {
                let (pa, pb) = (at(ma, p, na) * w, at(mb, p, nb) * w);
                for l in 0..w {
                    out.push(binary(*op, va[pa + l], vb[pb + l]));
                }
            }
            out
        }
        Op::Mean(a) => {
            let from = ir.node(*a).domain;
            let big_n = layout.domain_len(from);
            let m = bc.map(from, node.domain);
            let va = get(*a);
            let mut sums = vec![0f64; n * w];
            for p in 0..big_n {
                let q = at(m, p, n);
                for l in 0..w {
                    sums[q * w + l] += va[p * w + l].to_f64();
                }
            }
            let count = (big_n / n) as f64;
            sums.into_iter().map(|s| T::from_f64(s / count)).collect()
        }
        Op::Pack(xs) => {
            let maps: Vec<_> = xs.iter().map(|x| map(*x)).collect();
            let mut out = Vec::with_capacity(n * w);
            for p in 0..n {
                for (x, &(m, nx)) in xs.iter().zip(&maps) {
                    out.push(get(*x)[at(m, p, nx)]);
                }
            }
            out
        }
        Op::Dense { matrix, x } => {
            let m = ir.matrix(*matrix);
            let vx = get(*x);
            let mut out = Vec::with_capacity(n * m.rows);
            for p in 0..n {
                let xp = &vx[p * m.cols..(p + 1) * m.cols];
                for r in 0..m.rows {
                    let mut acc = m
                        .bias
                        .as_ref()
                        .map_or(T::default(), |b| T::from_f64(b[r] as f64));
                    let wr = &m.weight[r * m.cols..(r + 1) * m.cols];
                    for (&wv, &xv) in wr.iter().zip(xp) {
                        acc = acc + T::from_f64(wv as f64) * xv;
                    }
                    out.push(acc);
                }
            }
            out
        }
        Op::Lane { x, lane } => {
            let wx = ir.node(*x).width as usize;
            get(*x)
                .chunks_exact(wx)
                .map(|c| c[*lane as usize])
                .collect()
        }
        Op::Store { .. } => return None,
    })
}

/// The interpreter's inputs: the step's buffers and the live values.
struct Live<'a, T> {
    param: &'a [T],
    grad: &'a [T],
    state: &'a TensorState<T>,
    values: &'a [Option<Vec<T>>],
    bc: &'a Broadcasts,
}

impl<T: Real> NodeInputs<T> for Live<'_, T> {
    fn value(&self, v: ValueId) -> &[T] {
        self.values[v.index()]
            .as_deref()
            .expect("operands are computed before use and freed after their last use")
    }

    fn buffer(&self, b: Buffer) -> &[T] {
        match b {
            Buffer::Param => self.param,
            Buffer::Grad => self.grad,
            b => self.state.get(b),
        }
    }

    fn broadcasts(&self) -> &Broadcasts {
        self.bc
    }
}

/// Executes one step of `ir`: returns the new parameter and the new state (step counter + 1).
/// Nothing is modified in place, so a failure leaves the caller's data untouched.
pub fn execute<T: Real>(
    ir: &StepIr,
    param: &[T],
    grad: &[T],
    state: &TensorState<T>,
    hyper: Hyper,
) -> Result<(Vec<T>, TensorState<T>)> {
    let layout = &ir.layout;
    check_step_args(layout, param.len(), grad.len(), &hyper)?;
    super::check_state_layout(layout, state)?;
    let bc = Broadcasts::for_ir(ir);
    let last_use = ir.last_uses();
    let mut values: Vec<Option<Vec<T>>> = vec![None; ir.nodes.len()];
    let mut new_param = param.to_vec();
    let mut new_state = state.clone();
    new_state.step = crate::state::next_step(state.step)?;

    for (i, node) in ir.nodes.iter().enumerate() {
        let live = Live {
            param,
            grad,
            state,
            values: &values,
            bc: &bc,
        };
        let out = eval_node(ir, i, &live, state.step, &hyper);
        if let Op::Store {
            buffer,
            lane,
            value,
        } = &node.op
        {
            let n = layout.domain_len(node.domain);
            let vd = ir.node(*value).domain;
            let (map, vn) = (bc.map(node.domain, vd), layout.domain_len(vd));
            let v = live.value(*value);
            let mut stored = Vec::with_capacity(n);
            for p in 0..n {
                stored.push(v[at(map, p, vn)]);
            }
            let dst: &mut [T] = match buffer {
                Buffer::Param => &mut new_param,
                b => new_state.get_mut(*b),
            };
            let start = *lane as usize * n;
            dst[start..start + n].copy_from_slice(&stored);
        }
        values[i] = out;
        // Free every operand whose last use this was.
        for operand in node.op.operands() {
            if last_use[operand.index()] == i {
                values[operand.index()] = None;
            }
        }
    }
    Ok((new_param, new_state))
}

/// A [`TensorStepper`] running the reference interpreter in f32.
pub struct InterpStepper {
    ir: Arc<StepIr>,
    state: TensorState,
}

impl InterpStepper {
    /// A stepper with zero state and step counter `start_step`.
    pub fn new(ir: Arc<StepIr>, start_step: u64) -> Self {
        let state = TensorState::zeros(&ir.layout, start_step);
        InterpStepper { ir, state }
    }
}

impl TensorStepper for InterpStepper {
    fn target(&self) -> &'static str {
        "interp"
    }

    fn layout(&self) -> &Layout {
        &self.ir.layout
    }

    fn step(&mut self, param: &mut [f32], grad: &[f32], hyper: Hyper) -> Result<()> {
        let (new_param, new_state) = execute(&self.ir, param, grad, &self.state, hyper)?;
        param.copy_from_slice(&new_param);
        self.state = new_state;
        Ok(())
    }

    fn state(&self) -> Result<TensorState> {
        Ok(self.state.clone())
    }

    fn state_into(&self, into: &mut Option<TensorState>) -> Result<()> {
        match into {
            Some(snapshot) if snapshot.layout() == self.state.layout() => {
                for (b, data) in self.state.iter() {
                    snapshot.get_mut(b).copy_from_slice(data);
                }
                snapshot.step = self.state.step;
            }
            _ => *into = Some(self.state.clone()),
        }
        Ok(())
    }

    fn state_is_finite(&self) -> Result<bool> {
        Ok(self
            .state
            .iter()
            .all(|(_, v)| v.iter().all(|x| x.is_finite())))
    }

    fn set_state(&mut self, state: TensorState) -> Result<()> {
        super::check_state_layout(&self.ir.layout, &state)?;
        self.state = state;
        Ok(())
    }
}

/// The reference interpreter ([`InterpStepper`], f32) as a [`StepperFactory`](crate::backend::StepperFactory).
#[derive(Clone, Copy, Debug, Default)]
pub struct InterpFactory;

impl crate::backend::StepperFactory for InterpFactory {
    fn target(&self) -> &'static str {
        "interp"
    }

    fn stepper(&self, ir: Arc<StepIr>, start_step: u64) -> Result<Box<dyn TensorStepper>> {
        Ok(Box::new(InterpStepper::new(ir, start_step)))
    }
}
