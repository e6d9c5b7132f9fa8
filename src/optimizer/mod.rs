//! One optimizer over a whole model: many named tensors stepped in one call, μP learning
//! rates, gradient clipping, a non-finite-gradient policy and checkpoints.
//!
//! ```
//! use mulo::lopt::LearnedOptimizer;
//! use mulo::optimizer::{MuloOptimizer, OptimizerOptions, ParamSpec};
//!
//! let lopt = LearnedOptimizer::demo();
//! let specs = vec![
//!     // μP: give each tensor's shape in the base (narrow) model.
//!     ParamSpec::new("w1", &[64, 8])?.with_base_shape(&[16, 8])?,  // input layer: lr
//!     ParamSpec::new("w2", &[64, 64])?.with_base_shape(&[16, 16])?, // hidden: lr / 4
//!     ParamSpec::new("b2", &[64])?.with_base_shape(&[16])?,         // bias: lr
//! ];
//! let options = OptimizerOptions { max_grad_norm: Some(1.0), ..Default::default() };
//! let mut opt = MuloOptimizer::new(&lopt, specs, options)?;
//! let (mut w1, mut w2, mut b2) = (vec![0.1f32; 512], vec![0.1f32; 4096], vec![0.0f32; 64]);
//! let (g1, g2, gb) = (vec![0.01f32; 512], vec![0.01f32; 4096], vec![f32::NAN; 64]);
//! for step in 0..3 {
//!     let lr = 1e-2 * (1.0 - step as f32 / 3.0); // any schedule: lr is given per step
//!     let report = opt.step(&mut [&mut w1, &mut w2, &mut b2], &[&g1, &g2, &gb], lr, 0.0)?;
//!     assert_eq!(report.skipped, ["b2"]); // the NaN gradient is skipped, not spread
//! }
//! assert_eq!(opt.step_count(), 3);
//! # Ok::<(), mulo::Error>(())
//! ```
//!
//! The work of a step is split in two: everything that is the same on every backend (argument
//! checks, μP, clipping, non-finite handling, the step counter, checkpoints) happens here, on
//! the host; the step programs run in a [`ModelBackend`], which receives
//! the whole batch of tensors at once so that a packed GPU backend can step a model in a fixed
//! number of launches (see [`crate::backend::model`]).

mod checkpoint;
mod empty;

/// `docs/training.md`, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/training.md")]
pub struct TrainingGuide;
pub mod clip;
pub mod mup;
pub mod nonfinite;

pub use checkpoint::{CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_KEY};
pub use mup::{LrRule, LrScale, MupInfo};
pub use nonfinite::{NonFiniteCount, NonFinitePolicy};

use crate::backend::{BackendFactory, Hyper, ModelBackend, TensorStep};
use crate::error::{Error, Result};
use crate::lopt::LearnedOptimizer;
use crate::shape::{FactoredAxes, Layout, Shape};
use crate::state::TensorState;
use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

/// A tensor of a PyLO state: its PyLO name (`mom`, `fac_vec_row`, …), shape and values.
pub type PyloTensor = (String, Vec<usize>, Vec<f32>);

/// One parameter tensor of the model: its name, shape, factored axes and learning-rate rule.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// A unique name (used in reports, errors and checkpoints).
    pub name: String,
    /// The tensor's shape.
    pub shape: Shape,
    /// The factored axes (d0, d1) of a tensor of rank ≥ 2; `None`: the default, the stable
    /// order of SPEC.md §2. Set it ([`ParamSpec::with_factored_axes`]) to reproduce a PyLO run
    /// whose host ordered tied largest axes the other way.
    pub factored_axes: Option<FactoredAxes>,
    /// How its learning rate relates to the optimizer's (μP).
    pub lr_scale: LrScale,
}

impl ParamSpec {
    /// A tensor of shape `dims` (empty for a 0-d tensor), stepped with the optimizer's lr.
    pub fn new(name: impl Into<String>, dims: &[usize]) -> Result<Self> {
        Ok(Self::with_shape(name, Shape::new(dims.to_vec())?))
    }

    /// A tensor of an already-built shape.
    pub fn with_shape(name: impl Into<String>, shape: Shape) -> Self {
        ParamSpec {
            name: name.into(),
            shape,
            factored_axes: None,
            lr_scale: LrScale::Unscaled,
        }
    }

    /// A tensor of an already-resolved layout: its shape and factored axes (e.g. a
    /// [`Trajectory`](crate::trajectory::Trajectory)'s, which come from PyLO's recording).
    pub fn with_layout(name: impl Into<String>, layout: &Layout) -> Self {
        ParamSpec {
            factored_axes: layout.factored(),
            ..Self::with_shape(name, layout.shape().clone())
        }
    }

    /// States the factored axes (SPEC.md §2): `d0` the largest axis (the row accumulators are
    /// reduced over it), `d1` the second largest. An invalid pair (the same axis twice, out of
    /// range, not of the two largest sizes, or a tensor of rank ≤ 1) is an error naming the
    /// tensor.
    pub fn with_factored_axes(mut self, d0: usize, d1: usize) -> Result<Self> {
        let axes = FactoredAxes { d0, d1 };
        axes.check(self.shape.dims())
            .map_err(|reason| Error::argument(&self.name, reason))?;
        self.factored_axes = Some(axes);
        Ok(self)
    }

    /// The tensor's layout: its shape with the factored axes resolved.
    pub fn layout(&self) -> Result<Layout> {
        Layout::with_axes(self.shape.clone(), self.factored_axes)
            .map_err(|e| Error::argument(&self.name, e.to_string()))
    }

    /// μP: the tensor's shape in the base model (mup's `set_base_shapes`); same rank required.
    pub fn with_base_shape(mut self, dims: &[usize]) -> Result<Self> {
        self.lr_scale = LrScale::BaseShape(Shape::new(dims.to_vec())?);
        Ok(self)
    }

    /// An explicit learning-rate multiplier: the tensor is stepped with `lr · multiplier`.
    pub fn with_lr_multiplier(mut self, multiplier: f64) -> Self {
        self.lr_scale = LrScale::Multiplier(multiplier);
        self
    }
}

/// Options of a [`MuloOptimizer`].
#[derive(Clone)]
pub struct OptimizerOptions {
    /// Clip each tensor's gradient to this L2 norm before the step (PyLO's `max_grad_norm`).
    pub max_grad_norm: Option<f32>,
    /// Clip all gradients together to this global L2 norm (after per-tensor clipping, over the
    /// tensors that are not skipped).
    pub global_max_grad_norm: Option<f32>,
    /// What to do with NaN or ±Inf in a gradient (default: skip the tensor).
    pub nonfinite: NonFinitePolicy,
    /// Check every stepped tensor's new parameter and state for NaN and ±Inf, and undo the
    /// step of a tensor that has any (default: on). A finite gradient can still overflow the
    /// f32 step (`g²` is infinite for |g| > 1.8e19, as for the `f32::MAX` that
    /// [`NonFinitePolicy::Zero`] puts for +Inf), so this is what guarantees that no parameter
    /// or state is ever silently corrupted. It costs one copy of each stepped tensor's
    /// parameter and state per step, into buffers kept between steps (memory for one more copy
    /// of the parameters and states, allocated once) and a scan of the new values; turned off, the new parameters are still scanned and a
    /// non-finite one makes the step fail (and the optimizer refuse to continue) instead.
    pub guard: bool,
    /// Where the step programs run (default: the reference interpreter on the CPU).
    pub backend: Arc<dyn BackendFactory>,
}

impl Default for OptimizerOptions {
    fn default() -> Self {
        OptimizerOptions {
            max_grad_norm: None,
            global_max_grad_norm: None,
            nonfinite: NonFinitePolicy::Skip,
            guard: true,
            backend: crate::backend::default_factory(),
        }
    }
}

impl fmt::Debug for OptimizerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OptimizerOptions")
            .field("max_grad_norm", &self.max_grad_norm)
            .field("global_max_grad_norm", &self.global_max_grad_norm)
            .field("nonfinite", &self.nonfinite)
            .field("guard", &self.guard)
            .field("backend", &self.backend.target())
            .finish()
    }
}

/// What one [`MuloOptimizer::step`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepReport {
    /// The step counter before this step (0 on the first step).
    pub step: u64,
    /// Tensors left unchanged because their gradient held NaN or ±Inf
    /// ([`NonFinitePolicy::Skip`]).
    pub skipped: Vec<String>,
    /// Tensors whose gradient had NaN or ±Inf replaced ([`NonFinitePolicy::Zero`]).
    pub sanitized: Vec<String>,
    /// Every tensor whose gradient held NaN or ±Inf, with the counts.
    pub nonfinite: Vec<(String, NonFiniteCount)>,
    /// Tensors whose gradient was scaled down by per-tensor clipping, with its norm before.
    pub clipped: Vec<(String, f64)>,
    /// The global gradient norm (after per-tensor clipping), when global clipping is on.
    pub global_norm: Option<f64>,
    /// The factor every gradient was multiplied by, when global clipping scaled them.
    pub global_clip_coef: Option<f32>,
    /// Tensors whose step produced NaN or ±Inf (in the parameter or the state) and was undone
    /// by the guard ([`OptimizerOptions::guard`]); they are listed in `skipped` too.
    pub reverted: Vec<String>,
    /// Tensors given no gradient ([`MuloOptimizer::step_partial`]), left unchanged.
    pub without_grad: Vec<String>,
}

/// A μLO_M optimizer over every parameter tensor of a model.
///
/// One step counter for the whole optimizer (PyLO keeps one per parameter group); every
/// tensor's [`TensorState::step`] equals it. Every argument is checked before anything is
/// modified: a step that returns an error has changed no parameter and no state.
///
/// `Send + Sync` (checked at compile time, and by `tests/reliability.rs`): an optimizer can
/// be moved to a training thread, or shared between threads behind a `Mutex`/`RwLock`;
/// [`step`](Self::step) and the state setters take `&mut self`, the readers
/// ([`state`](Self::state), [`checkpoint_bytes`](Self::checkpoint_bytes)) `&self`, so several
/// threads may read one optimizer at once.
pub struct MuloOptimizer {
    lopt_fingerprint: String,
    specs: Vec<ParamSpec>,
    layouts: Vec<Layout>,
    rules: Vec<LrRule>,
    max_grad_norm: Option<f32>,
    global_max_grad_norm: Option<f32>,
    nonfinite: NonFinitePolicy,
    guard: bool,
    /// The guard's snapshot of every tensor (parameter, state), kept between steps so that
    /// taking it reuses the same buffers: allocating a model-sized copy every step cost more
    /// than the copy itself (page faults).
    guard_copies: Vec<GuardCopy>,
    backend: Box<dyn ModelBackend>,
    step: u64,
    poisoned: Option<String>,
}

/// One tensor's snapshot for the guard.
#[derive(Default)]
struct GuardCopy {
    param: Vec<f32>,
    state: Option<TensorState>,
}

impl fmt::Debug for MuloOptimizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuloOptimizer")
            .field("params", &self.specs.len())
            .field("backend", &self.backend.target())
            .field("step", &self.step)
            .finish()
    }
}

impl MuloOptimizer {
    /// An optimizer for `params` at step 0: checks the names (unique, not empty), resolves μP,
    /// and compiles `lopt` once per distinct shape on `options.backend`.
    ///
    /// A tensor with no elements (a dimension of size 0) is accepted and never changed: no
    /// program is compiled for it, its state is the zero-filled one of its layout (buffers
    /// spanning the empty axis have length 0), its step counter follows the optimizer's, and
    /// it is saved, loaded and exported like any other.
    pub fn new(
        lopt: &LearnedOptimizer,
        params: Vec<ParamSpec>,
        options: OptimizerOptions,
    ) -> Result<Self> {
        let mut seen = HashSet::new();
        for (i, p) in params.iter().enumerate() {
            if p.name.is_empty() {
                return Err(Error::argument(
                    format!("params[{i}]"),
                    "the parameter name is empty",
                ));
            }
            if !seen.insert(p.name.as_str()) {
                return Err(Error::argument(
                    &p.name,
                    format!("parameter name given twice (again at params[{i}])"),
                ));
            }
        }
        clip::check_max_norm("max_grad_norm", options.max_grad_norm)?;
        clip::check_max_norm("global_max_grad_norm", options.global_max_grad_norm)?;
        let rules = params
            .iter()
            .map(|p| LrRule::resolve(&p.name, &p.shape, &p.lr_scale))
            .collect::<Result<Vec<_>>>()?;
        let layouts = params
            .iter()
            .map(ParamSpec::layout)
            .collect::<Result<Vec<_>>>()?;
        // Zero-element tensors are kept beside the backend, which never sees them.
        let backend = empty::WithEmpty::build(options.backend.as_ref(), lopt, &layouts, 0)?;
        Ok(MuloOptimizer {
            lopt_fingerprint: lopt.fingerprint(),
            layouts,
            specs: params,
            rules,
            max_grad_norm: options.max_grad_norm,
            global_max_grad_norm: options.global_max_grad_norm,
            nonfinite: options.nonfinite,
            guard: options.guard,
            guard_copies: Vec::new(),
            backend,
            step: 0,
            poisoned: None,
        })
    }

    /// The parameters, in step order.
    pub fn params(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// The index of the parameter `name`.
    pub fn index_of(&self, name: &str) -> Result<usize> {
        self.specs
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| Error::argument(name, "no parameter of this name in the optimizer"))
    }

    /// The backend's name.
    pub fn target(&self) -> &'static str {
        self.backend.target()
    }

    /// Number of step programs compiled (one per distinct shape).
    pub fn compiled_plans(&self) -> usize {
        self.backend.compiled_plans()
    }

    /// The step counter: optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The effective learning-rate multiplier of every tensor (`lr_scaled / lr`).
    pub fn lr_multipliers(&self) -> Vec<(String, f64)> {
        self.specs
            .iter()
            .zip(&self.rules)
            .map(|(p, r)| (p.name.clone(), r.multiplier()))
            .collect()
    }

    /// The learning rate tensor `index` is stepped with when the optimizer's is `lr`.
    pub fn scaled_lr(&self, index: usize, lr: f32) -> f32 {
        self.rules[index].apply(lr)
    }

    /// The per-tensor clipping norm (PyLO's `max_grad_norm`).
    pub fn max_grad_norm(&self) -> Option<f32> {
        self.max_grad_norm
    }

    /// Changes the per-tensor clipping norm for the next steps (PyLO reads its parameter
    /// group's `max_grad_norm` at every step). Refused unless positive and finite.
    pub fn set_max_grad_norm(&mut self, max_grad_norm: Option<f32>) -> Result<()> {
        clip::check_max_norm("max_grad_norm", max_grad_norm)?;
        self.max_grad_norm = max_grad_norm;
        Ok(())
    }

    /// The SHA-256 fingerprint of the learned optimizer this was built for.
    pub fn lopt_fingerprint(&self) -> &str {
        &self.lopt_fingerprint
    }

    fn check_usable(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(Error::backend(
                self.backend.target(),
                format!(
                    "the optimizer is unusable after a failed step ({why}); load a checkpoint \
                     or set every tensor's state to continue"
                ),
            )),
            None => Ok(()),
        }
    }

    /// One optimizer step over every tensor: `params[i]` and `grads[i]` belong to
    /// `self.params()[i]`. `lr` (any schedule: it is given per step) is scaled per tensor by
    /// μP; `weight_decay` is applied as `P ← P − lr_scaled·wd·P`.
    ///
    /// Order of operations: check every argument; handle non-finite gradients (policy);
    /// clip per tensor, then globally; step every tensor that is not skipped in one backend
    /// call; with the guard on, undo the step of any tensor whose new parameter or state is not
    /// finite; advance the step counter (for skipped tensors too).
    pub fn step(
        &mut self,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        lr: f32,
        weight_decay: f32,
    ) -> Result<StepReport> {
        let grads: Vec<Option<&[f32]>> = grads.iter().map(|g| Some(*g)).collect();
        self.step_partial(params, &grads, lr, weight_decay)
    }

    /// [`step`](Self::step) where some tensors may have no gradient (`None`), as a PyTorch
    /// parameter whose `.grad` is `None`: such a tensor is left unchanged, like a skipped one
    /// (its accumulators are kept, its step counter follows the optimizer's, as PyLO's
    /// per-group counter does), and is listed in [`StepReport::without_grad`]. Its parameter
    /// is still given (and its length checked) so that indices stay those of
    /// [`params`](Self::params).
    pub fn step_partial(
        &mut self,
        params: &mut [&mut [f32]],
        grads: &[Option<&[f32]>],
        lr: f32,
        weight_decay: f32,
    ) -> Result<StepReport> {
        self.check_usable()?;
        // Checked first: at the counter's limit the step is refused before anything changes.
        let next = crate::state::next_step(self.step)?;
        let n = self.specs.len();
        for (what, len) in [("params", params.len()), ("grads", grads.len())] {
            if len != n {
                return Err(Error::argument(
                    what,
                    format!("{len} tensors given; the optimizer has {n} parameters"),
                ));
            }
        }
        for (i, spec) in self.specs.iter().enumerate() {
            let want = self.layouts[i].numel();
            let grad_len = grads[i].map_or(want, |g| g.len());
            for (what, len) in [("param", params[i].len()), ("grad", grad_len)] {
                if len != want {
                    return Err(Error::argument(
                        format!("{what} `{}`", spec.name),
                        format!(
                            "has {len} values; the parameter has shape {} ({want} values)",
                            spec.shape
                        ),
                    ));
                }
            }
        }
        Hyper { lr, weight_decay }.validate()?;
        let hypers: Vec<Hyper> = self
            .rules
            .iter()
            .map(|r| Hyper {
                lr: r.apply(lr),
                weight_decay,
            })
            .collect();
        for ((spec, h), layout) in self.specs.iter().zip(&hypers).zip(&self.layouts) {
            // A zero-element tensor's lr reaches no program (μP may make it infinite: its
            // width is 0).
            if layout.numel() == 0 {
                continue;
            }
            h.validate().map_err(|e| {
                Error::argument(
                    format!("lr of `{}`", spec.name),
                    format!("the μP-scaled learning rate is not usable: {e}"),
                )
            })?;
        }

        let mut report = StepReport {
            step: self.step,
            ..Default::default()
        };
        let counts: Vec<NonFiniteCount> = grads
            .iter()
            .map(|g| g.map_or_else(NonFiniteCount::default, NonFiniteCount::of))
            .collect();
        for (spec, c) in self.specs.iter().zip(&counts) {
            if !c.is_clean() {
                report.nonfinite.push((spec.name.clone(), *c));
            }
        }
        if self.nonfinite == NonFinitePolicy::Error && !report.nonfinite.is_empty() {
            let list: Vec<String> = report
                .nonfinite
                .iter()
                .map(|(name, c)| format!("`{name}` ({c})"))
                .collect();
            return Err(Error::argument(
                "grads",
                format!(
                    "non-finite gradient in {}; nothing was changed (non-finite policy: error)",
                    list.join(", ")
                ),
            ));
        }

        // The gradients the step will use: borrowed unless something had to change them.
        let mut work: Vec<Option<Cow<[f32]>>> = Vec::with_capacity(n);
        for (i, grad) in grads.iter().enumerate() {
            let Some(grad) = grad else {
                report.without_grad.push(self.specs[i].name.clone());
                work.push(None);
                continue;
            };
            if counts[i].is_clean() {
                work.push(Some(Cow::Borrowed(*grad)));
            } else if self.nonfinite == NonFinitePolicy::Skip {
                report.skipped.push(self.specs[i].name.clone());
                work.push(None);
            } else {
                let mut g = grad.to_vec();
                nonfinite::nan_to_num(&mut g);
                report.sanitized.push(self.specs[i].name.clone());
                work.push(Some(Cow::Owned(g)));
            }
        }
        if let Some(max_norm) = self.max_grad_norm {
            for (i, g) in work.iter_mut().enumerate() {
                if let Some(g) = g {
                    let norm = clip::l2_norm(g);
                    if let Some(coef) = clip::clip_coef(norm, max_norm) {
                        clip::scale(g.to_mut(), coef);
                        report.clipped.push((self.specs[i].name.clone(), norm));
                    }
                }
            }
        }
        if let Some(max_norm) = self.global_max_grad_norm {
            let total: f64 = work.iter().flatten().map(|g| clip::sum_squares(g)).sum();
            let norm = total.sqrt();
            report.global_norm = Some(norm);
            if let Some(coef) = clip::clip_coef(norm, max_norm) {
                report.global_clip_coef = Some(coef);
                for g in work.iter_mut().flatten() {
                    clip::scale(g.to_mut(), coef);
                }
            }
        }

        // The guard's copies, taken before anything changes.
        if self.guard {
            self.guard_copies
                .resize_with(params.len(), GuardCopy::default);
            for (i, g) in work.iter().enumerate() {
                if g.is_some() {
                    let copy = &mut self.guard_copies[i];
                    copy.param.clear();
                    copy.param.extend_from_slice(params[i]);
                    self.backend.state_into(i, &mut copy.state)?;
                }
            }
        }
        let mut batch: Vec<TensorStep> = params
            .iter_mut()
            .zip(&work)
            .enumerate()
            .filter_map(|(i, (p, g))| {
                g.as_ref().map(|g| TensorStep {
                    index: i,
                    param: p,
                    grad: g,
                    hyper: hypers[i],
                })
            })
            .collect();
        if let Err(e) = self.backend.step(&mut batch) {
            self.poisoned = Some(e.to_string());
            return Err(e);
        }
        drop(batch);
        let mut corrupted = Vec::new();
        for i in 0..params.len() {
            if work[i].is_none() {
                continue;
            }
            let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
            if !self.guard {
                if !finite(params[i]) {
                    corrupted.push(format!("`{}`", self.specs[i].name));
                }
                continue;
            }
            let state_finite = match self.backend.state_is_finite(i) {
                Ok(f) => f,
                Err(e) => {
                    self.poisoned = Some(e.to_string());
                    return Err(e);
                }
            };
            if finite(params[i]) && state_finite {
                continue;
            }
            // Undo: the old parameter and accumulators; the counter moves on like a skip.
            let copy = &mut self.guard_copies[i];
            params[i].copy_from_slice(&copy.param);
            let mut restored = copy
                .state
                .take()
                .expect("the guard took a snapshot of every stepped tensor");
            restored.step = next;
            if let Err(e) = self.backend.set_state(i, restored) {
                self.poisoned = Some(e.to_string());
                return Err(e);
            }
            report.reverted.push(self.specs[i].name.clone());
            report.skipped.push(self.specs[i].name.clone());
        }
        if !corrupted.is_empty() {
            let why = format!(
                "the step made the parameters {} non-finite (the guard is off, so they were \
                 not restored)",
                corrupted.join(", ")
            );
            self.poisoned = Some(why.clone());
            return Err(Error::backend(self.backend.target(), why));
        }
        // Skipped tensors keep their accumulators; their counter follows the optimizer's.
        for (i, g) in work.iter().enumerate() {
            if g.is_none() {
                let advanced = self.backend.state(i).and_then(|mut s| {
                    s.step = next;
                    self.backend.set_state(i, s)
                });
                if let Err(e) = advanced {
                    self.poisoned = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        self.step = next;
        Ok(report)
    }

    /// The state of parameter `name`, canonical layout.
    pub fn state(&self, name: &str) -> Result<TensorState> {
        self.backend.state(self.index_of(name)?)
    }

    /// Replaces the state of parameter `name`. Its step counter must equal the optimizer's
    /// (use [`set_step_count`](Self::set_step_count) first to move it), and its values must
    /// be a state stepping can reach ([`TensorState::validate`]: finite, accumulators ≥ 0,
    /// |mom| < 2^64); otherwise it is refused, naming the tensor and the rule, and nothing
    /// changes.
    pub fn set_state(&mut self, name: &str, state: TensorState) -> Result<()> {
        let i = self.index_of(name)?;
        self.check_state(i, &state)?;
        self.backend.set_state(i, state)
    }

    /// Replaces the states of several parameters at once: every state is checked as by
    /// [`set_state`](Self::set_state) before any is replaced, so a refused call changes
    /// nothing (e.g. a whole model's state loaded from a file).
    pub fn set_states(&mut self, states: Vec<(String, TensorState)>) -> Result<()> {
        let mut checked = Vec::with_capacity(states.len());
        let mut seen = HashSet::new();
        for (name, state) in states {
            let i = self.index_of(&name)?;
            if !seen.insert(i) {
                return Err(Error::argument(&name, "state given twice"));
            }
            self.check_state(i, &state)?;
            checked.push((i, state));
        }
        self.replace_states(checked)
    }

    /// Replaces checked states; a backend that fails part-way leaves the optimizer poisoned
    /// (some tensors replaced, some not), so that it is not stepped in that mixed state.
    fn replace_states(&mut self, states: Vec<(usize, TensorState)>) -> Result<()> {
        for (i, state) in states {
            if let Err(e) = self.backend.set_state(i, state) {
                self.poisoned = Some(e.to_string());
                return Err(e);
            }
        }
        Ok(())
    }

    fn check_state(&self, i: usize, state: &TensorState) -> Result<()> {
        let spec = &self.specs[i];
        if state.layout() != &self.layouts[i] {
            return Err(Error::argument(
                &spec.name,
                format!(
                    "state is for shape {}, the parameter has shape {}",
                    state.layout().shape(),
                    spec.shape
                ),
            ));
        }
        if state.step != self.step {
            return Err(Error::argument(
                &spec.name,
                format!(
                    "state has step counter {}, the optimizer {} (one counter for all tensors)",
                    state.step, self.step
                ),
            ));
        }
        state.validate().map_err(|why| {
            Error::argument(
                &spec.name,
                format!("state refused, nothing was changed: {why}"),
            )
        })
    }

    /// Sets the step counter of the optimizer and of every tensor's state (e.g. to PyLO's
    /// parameter-group `step` before importing its state). Accumulators are kept.
    pub fn set_step_count(&mut self, step: u64) -> Result<()> {
        self.check_usable()?;
        let states = (0..self.specs.len())
            .map(|i| self.backend.state(i))
            .collect::<Result<Vec<_>>>()?;
        self.step = step;
        for (i, mut s) in states.into_iter().enumerate() {
            s.step = step;
            self.backend.set_state(i, s)?;
        }
        Ok(())
    }

    /// Imports the PyLO `AdafacLO_naive` state of parameter `name` (decay-last `mom`, `rms`,
    /// `fac_vec_row`, `fac_vec_col` or `fac_vec_v`; `lookup` gives a tensor's shape and values
    /// by its PyLO name). The step counter is the optimizer's: set PyLO's group `step` with
    /// [`set_step_count`](Self::set_step_count). The values are checked as by
    /// [`set_state`](Self::set_state); a refused import changes nothing.
    pub fn import_pylo_state(
        &mut self,
        name: &str,
        lookup: impl FnMut(&str) -> Option<(Vec<usize>, Vec<f32>)>,
    ) -> Result<()> {
        let i = self.index_of(name)?;
        let state = TensorState::from_pylo(&self.layouts[i], self.step, lookup)
            .map_err(|e| Error::argument(name, format!("cannot import its PyLO state: {e}")))?;
        self.check_state(i, &state)?;
        self.backend.set_state(i, state)
    }

    /// The state of parameter `name` in PyLO's layout: `(pylo name, shape, values)`.
    pub fn export_pylo_state(&self, name: &str) -> Result<Vec<PyloTensor>> {
        Ok(self.state(name)?.to_pylo())
    }
}
