//! The reference interpreter: executes the IR node by node on the CPU, in f32 or f64.
//!
//! It is the executable definition every other backend is checked against, so it is written
//! for obviousness, not speed: every value is materialized over its whole domain. Means are
//! accumulated in f64 (SPEC.md §3.4: a running f32 sum over 10^5 elements costs a fifth of
//! the golden tolerance).

use super::{check_step_args, Hyper, TensorStepper};
use crate::error::Result;
use crate::ir::{Binary, Buffer, Op, RuntimeScalar, StepIr, Unary};
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

/// Index maps for broadcasting, built once per (big, small) domain pair.
struct Broadcasts<'a> {
    layout: &'a Layout,
    maps: HashMap<(Domain, Domain), Arc<Vec<usize>>>,
}

impl Broadcasts<'_> {
    /// `f(p)` = index in `small` of point `p` of `big`; `None` means the identity.
    fn map(&mut self, big: Domain, small: Domain) -> Option<Arc<Vec<usize>>> {
        if big == small {
            return None;
        }
        let layout = self.layout;
        Some(
            self.maps
                .entry((big, small))
                .or_insert_with(|| Arc::new(layout.broadcast_index(big, small)))
                .clone(),
        )
    }
}

fn at(map: &Option<Arc<Vec<usize>>>, p: usize) -> usize {
    match map {
        None => p,
        Some(m) => m[p],
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
    let mut bc = Broadcasts {
        layout,
        maps: HashMap::new(),
    };
    let last_use = ir.last_uses();
    let mut values: Vec<Option<Vec<T>>> = vec![None; ir.nodes.len()];
    let mut new_param = param.to_vec();
    let mut new_state = state.clone();
    new_state.step = state.step + 1;

    for (i, node) in ir.nodes.iter().enumerate() {
        let n = layout.domain_len(node.domain);
        let w = node.width as usize;
        let get = |v: crate::ir::ValueId| -> &Vec<T> {
            values[v.index()]
                .as_ref()
                .expect("operands are computed before use and freed after their last use")
        };
        let out: Option<Vec<T>> = match &node.op {
            Op::Load { buffer, lane } => {
                let data: &[T] = match buffer {
                    Buffer::Param => param,
                    Buffer::Grad => grad,
                    b => state.get(*b),
                };
                let start = *lane as usize * n;
                Some(data[start..start + n].to_vec())
            }
            Op::Scalar(s) => Some(vec![match s {
                RuntimeScalar::Lr => T::from_f64(hyper.lr as f64),
                RuntimeScalar::WeightDecay => T::from_f64(hyper.weight_decay as f64),
                RuntimeScalar::StepCount => T::from_f64(state.step as f64),
            }]),
            Op::Const(c) => Some(vec![T::from_f64(*c)]),
            Op::Unary(op, a) => Some(get(*a).iter().map(|&x| unary(*op, x)).collect()),
            Op::Binary(op, a, b) => {
                let (ma, mb) = (
                    bc.map(node.domain, ir.node(*a).domain),
                    bc.map(node.domain, ir.node(*b).domain),
                );
                let (va, vb) = (get(*a), get(*b));
                let mut out = Vec::with_capacity(n * w);
                for p in 0..n {
                    let (pa, pb) = (at(&ma, p) * w, at(&mb, p) * w);
                    for l in 0..w {
                        out.push(binary(*op, va[pa + l], vb[pb + l]));
                    }
                }
                Some(out)
            }
            Op::Mean(a) => {
                let from = ir.node(*a).domain;
                let big_n = layout.domain_len(from);
                let map = bc.map(from, node.domain);
                let va = get(*a);
                let mut sums = vec![0f64; n * w];
                for p in 0..big_n {
                    let q = if node.domain == Domain::Step {
                        0
                    } else {
                        at(&map, p)
                    };
                    for l in 0..w {
                        sums[q * w + l] += va[p * w + l].to_f64();
                    }
                }
                let count = (big_n / n) as f64;
                Some(sums.into_iter().map(|s| T::from_f64(s / count)).collect())
            }
            Op::Pack(xs) => {
                let maps: Vec<_> = xs
                    .iter()
                    .map(|x| bc.map(node.domain, ir.node(*x).domain))
                    .collect();
                let mut out = Vec::with_capacity(n * w);
                for p in 0..n {
                    for (x, m) in xs.iter().zip(&maps) {
                        out.push(get(*x)[at(m, p)]);
                    }
                }
                Some(out)
            }
            Op::Dense { matrix, x } => {
                let m = ir.matrix(*matrix);
                let weight: Vec<T> = m.weight.iter().map(|&v| T::from_f64(v as f64)).collect();
                let bias: Option<Vec<T>> = m
                    .bias
                    .as_ref()
                    .map(|b| b.iter().map(|&v| T::from_f64(v as f64)).collect());
                let vx = get(*x);
                let mut out = Vec::with_capacity(n * m.rows);
                for p in 0..n {
                    let xp = &vx[p * m.cols..(p + 1) * m.cols];
                    for r in 0..m.rows {
                        let mut acc = bias.as_ref().map_or(T::default(), |b| b[r]);
                        for (c, &xv) in xp.iter().enumerate() {
                            acc = acc + weight[r * m.cols + c] * xv;
                        }
                        out.push(acc);
                    }
                }
                Some(out)
            }
            Op::Lane { x, lane } => {
                let wx = ir.node(*x).width as usize;
                Some(
                    get(*x)
                        .chunks_exact(wx)
                        .map(|c| c[*lane as usize])
                        .collect(),
                )
            }
            Op::Store {
                buffer,
                lane,
                value,
            } => {
                let map = bc.map(node.domain, ir.node(*value).domain);
                let v = get(*value);
                let dst: &mut [T] = match buffer {
                    Buffer::Param => &mut new_param,
                    b => new_state.get_mut(*b),
                };
                let start = *lane as usize * n;
                for p in 0..n {
                    dst[start + p] = v[at(&map, p)];
                }
                None
            }
        };
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
