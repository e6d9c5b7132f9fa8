//! Optimizer state of one tensor in the canonical decay-major layout, and conversion from and
//! to PyLO's decay-last layout.
//!
//! | canonical (mulo, ONNX, CUDA) | PyLO `AdafacLO_naive` |
//! |---|---|
//! | `mom` `[3, *S]` | `mom` `[*S, 3]` |
//! | `rms` `[*S]` | `rms` `[*S, 1]` |
//! | `fac_row` `[3, *(S without d0)]` | `fac_vec_row` `[*(S without d0), 3]` |
//! | `fac_col` `[3, *(S without d1)]` | `fac_vec_col` `[*(S without d1), 3]` |
//! | `fac_v` `[3, *S]` (rank ≤ 1) | `fac_vec_v` `[*S, 3]` |

use crate::error::{Error, Result};
use crate::ir::Buffer;
use crate::shape::Layout;
use std::collections::BTreeMap;

/// The state of one tensor: every accumulator and the step counter.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorState<T = f32> {
    layout: Layout,
    /// The step counter t: steps taken so far.
    pub step: u64,
    buffers: BTreeMap<Buffer, Vec<T>>,
}

impl<T: Copy + Default> TensorState<T> {
    /// All accumulators zero, step counter `step`.
    pub fn zeros(layout: &Layout, step: u64) -> Self {
        let buffers = Buffer::state_for_layout(layout)
            .into_iter()
            .map(|b| (b, vec![T::default(); b.len(layout)]))
            .collect();
        TensorState {
            layout: layout.clone(),
            step,
            buffers,
        }
    }

    /// The tensor layout the state is for.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// A state buffer, decay-major. Panics if the layout has no such buffer.
    pub fn get(&self, buffer: Buffer) -> &[T] {
        &self.buffers[&buffer]
    }

    /// A state buffer, mutable.
    pub fn get_mut(&mut self, buffer: Buffer) -> &mut [T] {
        self.buffers
            .get_mut(&buffer)
            .expect("state buffer exists for this layout")
    }

    /// Replaces a buffer, checking its length.
    pub fn set(&mut self, buffer: Buffer, data: Vec<T>) -> Result<()> {
        let want = buffer.len(&self.layout);
        if !self.buffers.contains_key(&buffer) || data.len() != want {
            return Err(Error::argument(
                buffer.name(),
                format!(
                    "expected {want} values for shape {:?} of a {} tensor, got {}",
                    buffer.shape(&self.layout),
                    self.layout.shape(),
                    data.len()
                ),
            ));
        }
        self.buffers.insert(buffer, data);
        Ok(())
    }

    /// The buffers, in canonical order.
    pub fn iter(&self) -> impl Iterator<Item = (Buffer, &[T])> {
        self.buffers.iter().map(|(b, v)| (*b, v.as_slice()))
    }

    /// Converts every value (e.g. to f64 for a high-precision reference run).
    pub fn map<U: Copy + Default>(&self, f: impl Fn(T) -> U) -> TensorState<U> {
        TensorState {
            layout: self.layout.clone(),
            step: self.step,
            buffers: self
                .buffers
                .iter()
                .map(|(b, v)| (*b, v.iter().map(|&x| f(x)).collect()))
                .collect(),
        }
    }
}

/// PyLO's name of a state buffer.
pub fn pylo_name(buffer: Buffer) -> &'static str {
    match buffer {
        Buffer::Mom => "mom",
        Buffer::Rms => "rms",
        Buffer::FacRow => "fac_vec_row",
        Buffer::FacCol => "fac_vec_col",
        Buffer::FacV => "fac_vec_v",
        Buffer::Param => "param",
        Buffer::Grad => "grad",
    }
}

/// PyLO's shape of a state buffer: the domain shape with the lanes last. A 0-d tensor's
/// domain shape is `()`, so its state is `mom` (3), `rms` (1), `fac_vec_v` (3) (SPEC.md §2).
pub fn pylo_shape(buffer: Buffer, layout: &Layout) -> Vec<usize> {
    let mut shape = if layout.is_scalar() {
        Vec::new()
    } else {
        layout.domain_shape(buffer.domain())
    };
    shape.push(buffer.lanes());
    shape
}

/// The bound on `mom` ([`check_values`]): |mom| < 2^64, the f32 values whose square is finite.
/// (The largest f32 below 2^64 squares to 2^128 − 2^105 + 2^80, which rounds to a finite
/// f32; 2^64 squares to 2^128, which is +Inf.)
pub const MOM_LIMIT: f32 = 18_446_744_073_709_551_616.0;

/// Checks one state buffer's values against what a state reached by stepping can hold; the
/// error says which value breaks which rule (flat index in `values`' own order).
///
/// The rules, and why they hold for every state mulo or PyLO can reach (SPEC.md §3.1):
/// every accumulator starts at zero and is a running average `β·old + (1 − β)·new` of
/// - `mom`: the gradient g,
/// - `rms`: g²,
/// - `fac_row`, `fac_col`, `fac_v`: means of g² + 1e-30.
///
/// So every value is **finite**, `rms` and the factored accumulators are **≥ 0**, and
/// **|mom| < [`MOM_LIMIT`]** (2^64): a step whose g² is not finite makes `rms` infinite, and
/// mulo's step guard undoes it (PyLO keeps the Inf, which this refuses as non-finite), so
/// every g averaged into `mom` had |g| < 2^64. A value outside these rules is damage or a
/// foreign state, and it would freeze the tensor: a negative accumulator's square root is
/// NaN, and a finite but huge `mom` (3e38) makes the step's features infinite
/// (`mom·rsqrt(rms + 1e-6)` alone is up to 1000·mom), so the guard undoes every later step
/// of that tensor.
pub fn check_values(buffer: Buffer, values: &[f32]) -> std::result::Result<(), String> {
    let first = |bad: &dyn Fn(f32) -> bool| values.iter().position(|&v| bad(v));
    if let Some(i) = first(&|v: f32| !v.is_finite()) {
        return Err(format!(
            "holds a non-finite value ({}) at flat index {i}: every state value must be finite",
            values[i]
        ));
    }
    match buffer {
        Buffer::Mom => {
            if let Some(i) = first(&|v: f32| v.abs() >= MOM_LIMIT) {
                return Err(format!(
                    "holds {:e} at flat index {i}: a momentum is an average of gradients, and \
                     |mom| must be below 2^64 ({MOM_LIMIT:e}, where its square overflows f32)",
                    values[i]
                ));
            }
        }
        Buffer::Rms | Buffer::FacRow | Buffer::FacCol | Buffer::FacV => {
            if let Some(i) = first(&|v: f32| v < 0.0) {
                return Err(format!(
                    "holds a negative value ({:e}) at flat index {i}: a second-moment \
                     accumulator is an average of squares and must be ≥ 0",
                    values[i]
                ));
            }
        }
        Buffer::Param | Buffer::Grad => {}
    }
    Ok(())
}

/// The step counter after one more step; refused at `u64::MAX` (where it would wrap to 0),
/// so that a caller checks it before changing anything.
pub fn next_step(step: u64) -> Result<u64> {
    step.checked_add(1).ok_or_else(|| {
        Error::argument(
            "step",
            format!(
                "the step counter is at its limit ({step}): one more step would wrap it to 0, \
                 so the step is refused and nothing was changed"
            ),
        )
    })
}

impl TensorState<f32> {
    /// Checks every buffer with [`check_values`]; the error names the buffer and the rule.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (buffer, values) in self.iter() {
            check_values(buffer, values).map_err(|why| format!("`{}` {why}", buffer.name()))?;
        }
        Ok(())
    }

    /// Reads a PyLO state (decay-last tensors named `mom`, `rms`, `fac_vec_row`, … as
    /// [`pylo_name`] gives); `lookup` returns a tensor's shape and values, or `None` if absent.
    /// Every buffer is checked with [`check_values`] (the error names its PyLO name).
    pub fn from_pylo(
        layout: &Layout,
        step: u64,
        mut lookup: impl FnMut(&str) -> Option<(Vec<usize>, Vec<f32>)>,
    ) -> Result<Self> {
        let mut state = Self::zeros(layout, step);
        for buffer in Buffer::state_for_layout(layout) {
            let name = pylo_name(buffer);
            let (shape, values) = lookup(name).ok_or_else(|| {
                Error::argument(
                    name,
                    format!("missing from the PyLO state of a {} tensor", layout.shape()),
                )
            })?;
            let want = pylo_shape(buffer, layout);
            if shape != want {
                return Err(Error::argument(
                    name,
                    format!(
                        "has shape {shape:?}; a {} tensor's PyLO state has {want:?}",
                        layout.shape()
                    ),
                ));
            }
            check_values(buffer, &values).map_err(|why| Error::argument(name, why))?;
            state.set(buffer, transpose(&values, buffer.lanes()))?;
        }
        Ok(state)
    }

    /// The state in PyLO's layout: `(name, shape, values)` for every buffer.
    pub fn to_pylo(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        self.iter()
            .map(|(buffer, values)| {
                let lanes = buffer.lanes();
                let points = values.len() / lanes;
                (
                    pylo_name(buffer).to_string(),
                    pylo_shape(buffer, &self.layout),
                    transpose(values, points),
                )
            })
            .collect()
    }
}

/// Transposes a row-major `[values.len() / cols, cols]` matrix.
fn transpose(values: &[f32], cols: usize) -> Vec<f32> {
    // No columns: a buffer of a zero-element tensor, which has no values either.
    let rows = values.len().checked_div(cols).unwrap_or(0);
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::Shape;

    #[test]
    fn pylo_round_trip_transposes_lanes() {
        let layout = Layout::new(Shape::new(vec![2, 3]).unwrap()); // d0 = 1, d1 = 0
        let mut state = TensorState::<f32>::zeros(&layout, 5);
        let mom: Vec<f32> = (0..18).map(|x| x as f32).collect();
        state.set(Buffer::Mom, mom.clone()).unwrap();
        let pylo = state.to_pylo();
        let (name, shape, values) = &pylo.iter().find(|p| p.0 == "mom").unwrap();
        assert_eq!((name.as_str(), shape.as_slice()), ("mom", &[2, 3, 3][..]));
        // Canonical [lane 1, element 0] is PyLO [element 0, lane 1].
        assert_eq!(values[1], mom[6]);
        let back = TensorState::from_pylo(&layout, 5, |n| {
            pylo.iter()
                .find(|p| p.0 == n)
                .map(|p| (p.1.clone(), p.2.clone()))
        })
        .unwrap();
        assert_eq!(back, state);
        let err = TensorState::from_pylo(&layout, 0, |_| None).unwrap_err();
        assert!(err.to_string().contains("mom"), "{err}");
    }

    #[test]
    fn scalar_pylo_state_has_pylo_shapes() {
        let layout = Layout::new(Shape::new(vec![]).unwrap());
        let state = TensorState::<f32>::zeros(&layout, 0);
        let shapes: Vec<(String, Vec<usize>)> = state
            .to_pylo()
            .into_iter()
            .map(|(name, shape, _)| (name, shape))
            .collect();
        assert_eq!(
            shapes,
            [
                ("mom".to_string(), vec![3]),
                ("rms".to_string(), vec![1]),
                ("fac_vec_v".to_string(), vec![3])
            ]
        );
    }
}
