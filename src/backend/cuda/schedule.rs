//! Partitions a [`StepIr`] into CUDA kernels, generically over the IR (nothing here knows
//! what a feature is), rendering the target-independent [`PassPlan`] (levels, passes and
//! stages: see [`crate::plan`]).
//!
//! - **Elem kernels** (`E_k`) are the passes over the element data. A reduce pass computes,
//!   in registers, the operands of the element means it is given and writes their per-block
//!   partial sums (deterministic: fixed thread-to-element map, fixed-order trees). The last
//!   pass computes what the element-domain stores need and stores it.
//! - **Small kernels** (`S_k`, one thread block) are the stages before `E_k`: they finish the
//!   element means reduced by the previous pass (fixed order), and compute the stage's nodes on
//!   the row/column/rest/step domains into a scratch arena. The last small kernel also performs
//!   the stores of those domains (the state buffers `fac_row`, `fac_col`), after every load of
//!   them.
//! - Constants and runtime scalars are inlined where they are used.

use crate::ir::{Op, StepIr, ValueId};
pub use crate::plan::{elem_closure, is_elem_mean, levels, PassPlan};

/// Threads of every block, elem or small.
pub const BLOCK_THREADS: usize = 256;
/// Rows of its tile each elem-kernel thread walks (caps the tile along the Y axis).
pub const ROWS_PER_THREAD: usize = 4;

/// The most blocks a launch may have along x (CUDA's `maxGridDimX`, 2^31 − 1 on every
/// architecture since sm_30).
pub const MAX_GRID_X: u32 = i32::MAX as u32;

/// [`BLOCK_THREADS`] as the `u32` of a launch's block dimension (checked at compile time).
pub const BLOCK_DIM_X: u32 = {
    assert!(
        BLOCK_THREADS <= 1024,
        "CUDA blocks have at most 1024 threads"
    );
    BLOCK_THREADS as u32
};

/// `blocks` as the x dimension of a CUDA grid, or an error naming `what` when it exceeds
/// [`MAX_GRID_X`] (no silent truncation).
pub fn grid_dim(blocks: usize, what: &str) -> crate::error::Result<u32> {
    u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= MAX_GRID_X)
        .ok_or_else(|| {
            crate::error::Error::backend(
                "cuda",
                format!(
                    "{what} needs {blocks} blocks, more than CUDA's limit of {MAX_GRID_X} blocks per grid"
                ),
            )
        })
}

/// How the element domain is cut into thread blocks: the tensor is viewed as
/// `[rest axes…] × Y × X`, where X is the factored axis with the smaller stride (a virtual
/// axis of size 1 for unfactored tensors) and Y the other one (the whole tensor when
/// unfactored). A block covers one rest point and a `BY·J × BX` tile of `Y × X`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tiling {
    /// The tensor axis along threadIdx x, or `None` (virtual axis of size 1).
    pub x_axis: Option<usize>,
    /// The tensor axis along threadIdx y (for rank ≤ 1 tensors: axis 0).
    pub y_axis: usize,
    /// The other axes, in order.
    pub rest_axes: Vec<usize>,
    /// Size of X.
    pub nx: usize,
    /// Size of Y.
    pub ny: usize,
    /// Number of rest points.
    pub rest_len: usize,
    /// Threads along X (a power of two ≤ 32).
    pub bx: usize,
    /// Threads along Y (`BLOCK_THREADS / bx`).
    pub by: usize,
    /// Rows of the tile each thread walks.
    pub rows_per_thread: usize,
    /// Tiles along X.
    pub tiles_x: usize,
    /// Tiles along Y.
    pub tiles_y: usize,
}

impl Tiling {
    /// The tiling of `layout`.
    pub fn of(layout: &crate::shape::Layout) -> Self {
        let dims = layout.dims();
        let (x_axis, y_axis) = match layout.factored() {
            // The larger axis index has the smaller row-major stride.
            Some(f) => (Some(f.d0.max(f.d1)), f.d0.min(f.d1)),
            None => (None, 0),
        };
        let rest_axes: Vec<usize> = (0..dims.len())
            .filter(|&a| Some(a) != x_axis && a != y_axis)
            .collect();
        let nx = x_axis.map_or(1, |a| dims[a]);
        let ny = dims[y_axis];
        let rest_len = rest_axes.iter().map(|&a| dims[a]).product();
        let bx = nx.next_power_of_two().min(32);
        let by = BLOCK_THREADS / bx;
        let rows_per_thread = ny.div_ceil(by).clamp(1, ROWS_PER_THREAD);
        Tiling {
            x_axis,
            y_axis,
            rest_axes,
            nx,
            ny,
            rest_len,
            bx,
            by,
            rows_per_thread,
            tiles_x: nx.div_ceil(bx),
            tiles_y: ny.div_ceil(by * rows_per_thread),
        }
    }

    /// Blocks of an elem kernel.
    pub fn blocks(&self) -> usize {
        self.rest_len * self.tiles_x * self.tiles_y
    }

    /// Blocks per rest point.
    pub fn blocks_per_rest(&self) -> usize {
        self.tiles_x * self.tiles_y
    }
}

/// How the per-block partial sums of an element mean are laid out (f64, in the partials
/// arena), and how many of them make up one output point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartialKind {
    /// The mean keeps X and reduces Y: `[tiles_y][points][width]`.
    KeepX,
    /// The mean keeps Y and reduces X: `[tiles_x][points][width]`.
    KeepY,
    /// The mean reduces X and Y (rest or step target): one value per block,
    /// `[blocks][width]`; blocks of one rest point are contiguous.
    Blocks,
}

/// An element-domain mean: where its partials go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElemMean {
    /// The `Mean` node.
    pub node: ValueId,
    /// Its operand (on the element domain).
    pub operand: ValueId,
    /// The partial layout.
    pub kind: PartialKind,
    /// Offset of its partials in the f64 arena.
    pub partial_offset: usize,
    /// Number of partials summed into one output lane.
    pub partials_per_point: usize,
}

/// What a kernel does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// One pass over the elements: partial sums of `means`, or (when `stores`) the stores.
    Elem {
        /// Element means whose partials this pass writes.
        means: Vec<ElemMean>,
        /// Whether this is the last pass, performing the element-domain stores.
        stores: bool,
    },
    /// One block: the small-domain nodes in `nodes` (topological order; element means among
    /// them are finished from their partials), then the small-domain `stores`.
    Small {
        /// Nodes computed into scratch.
        nodes: Vec<ValueId>,
        /// Store nodes performed at the end.
        stores: Vec<ValueId>,
    },
}

/// One kernel of the step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// Entry name in the PTX.
    pub name: String,
    /// The level it belongs to.
    pub level: u32,
    /// What it does.
    pub kind: KernelKind,
}

/// The kernels of one step, in launch order, and the scratch they share.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Kernels in launch order.
    pub kernels: Vec<Kernel>,
    /// Level of every node.
    pub levels: Vec<u32>,
    /// The element tiling.
    pub tiling: Tiling,
    /// For every node materialized in the f32 scratch arena: its offset (`None` otherwise).
    pub scratch_offset: Vec<Option<usize>>,
    /// f32 values in the scratch arena.
    pub scratch_len: usize,
    /// f64 values in the partials arena.
    pub partials_len: usize,
    /// Number of passes over the element data.
    pub elem_passes: usize,
}

/// Schedules `ir` into kernels (see the module documentation).
pub fn schedule(ir: &StepIr) -> Schedule {
    let layout = &ir.layout;
    let tiling = Tiling::of(layout);
    let plan = PassPlan::of(ir);
    let n = ir.nodes.len();
    let max_level = plan.last;
    let slot = &plan.stage;
    let elem_means = &plan.pass_means;

    // Scratch offsets for the materialized small nodes.
    let mut scratch_offset = vec![None; n];
    let mut scratch_len = 0usize;
    for (i, node) in ir.nodes.iter().enumerate() {
        if slot[i].is_some() && !matches!(node.op, Op::Store { .. }) {
            scratch_offset[i] = Some(scratch_len);
            scratch_len += layout.domain_len(node.domain) * node.width as usize;
        }
    }
    // Partials for the element means.
    let mut partials_len = 0usize;
    let mut mean_info = |m: ValueId| -> ElemMean {
        let node = ir.node(m);
        let axes = layout.domain_axes(node.domain);
        let keeps = |a: Option<usize>| a.is_some_and(|a| axes.contains(&a));
        let (kind, tiles) = if keeps(tiling.x_axis) {
            (PartialKind::KeepX, tiling.tiles_y)
        } else if axes.contains(&tiling.y_axis) {
            (PartialKind::KeepY, tiling.tiles_x)
        } else {
            (PartialKind::Blocks, tiling.blocks())
        };
        let count = match kind {
            PartialKind::Blocks => tiles,
            _ => tiles * layout.domain_len(node.domain),
        };
        let info = ElemMean {
            node: m,
            operand: node.op.operands()[0],
            kind,
            partial_offset: partials_len,
            partials_per_point: match kind {
                PartialKind::Blocks => tiling.blocks() / layout.domain_len(node.domain).max(1),
                _ => tiles,
            },
        };
        partials_len += count * node.width as usize;
        info
    };

    let mut kernels = Vec::new();
    let mut elem_passes = 0;
    for k in 0..=max_level {
        let nodes = plan.stage_nodes(ir, k);
        let stores = if k == max_level {
            plan.small_stores.clone()
        } else {
            Vec::new()
        };
        if !nodes.is_empty() || !stores.is_empty() {
            kernels.push(Kernel {
                name: format!("mulo_small_{k}"),
                level: k,
                kind: KernelKind::Small { nodes, stores },
            });
        }
        let last = k == max_level;
        if !last && elem_means[k as usize].is_empty() {
            continue;
        }
        let means: Vec<ElemMean> = elem_means[k as usize]
            .iter()
            .map(|&m| mean_info(m))
            .collect();
        kernels.push(Kernel {
            name: if last {
                format!("mulo_elem_{k}_update")
            } else {
                format!("mulo_elem_{k}_reduce")
            },
            level: k,
            kind: KernelKind::Elem {
                means,
                stores: last,
            },
        });
        elem_passes += 1;
    }
    Schedule {
        kernels,
        levels: plan.levels,
        tiling,
        scratch_offset,
        scratch_len,
        partials_len,
        elem_passes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lopt::LearnedOptimizer;
    use crate::shape::Shape;

    fn sched(shape: &str) -> Schedule {
        let ir =
            crate::compile_step(&Shape::parse(shape).unwrap(), &LearnedOptimizer::demo()).unwrap();
        schedule(&ir)
    }

    fn kinds(s: &Schedule) -> Vec<String> {
        s.kernels.iter().map(|k| k.name.clone()).collect()
    }

    #[test]
    fn factored_needs_three_elem_passes() {
        let s = sched("64x32");
        assert_eq!(s.elem_passes, 3);
        assert_eq!(
            kinds(&s),
            [
                "mulo_elem_0_reduce",
                "mulo_small_1",
                "mulo_elem_1_reduce",
                "mulo_small_2",
                "mulo_elem_2_update"
            ]
        );
        // Pass 0 reduces q over d0 and over d1 (two means), pass 1 the 16 element features².
        let means = |k: usize| match &s.kernels[k].kind {
            KernelKind::Elem { means, .. } => means.len(),
            _ => unreachable!(),
        };
        assert_eq!(means(0), 2);
        assert_eq!(means(2), 16);
        // The row/column accumulators are stored by the last small kernel.
        match &s.kernels[3].kind {
            KernelKind::Small { stores, .. } => assert_eq!(stores.len(), 6),
            _ => unreachable!(),
        }
    }

    #[test]
    fn unfactored_needs_two_elem_passes() {
        for shape in ["37", "1", "scalar"] {
            let s = sched(shape);
            assert_eq!(s.elem_passes, 2, "{shape}");
            assert_eq!(
                kinds(&s),
                ["mulo_elem_0_reduce", "mulo_small_1", "mulo_elem_1_update"],
                "{shape}"
            );
        }
    }

    #[test]
    fn grid_dims_are_checked() {
        assert_eq!(grid_dim(0, "k").unwrap(), 0);
        assert_eq!(grid_dim(MAX_GRID_X as usize, "k").unwrap(), MAX_GRID_X);
        let err = grid_dim(MAX_GRID_X as usize + 1, "kernel k").unwrap_err();
        assert!(
            err.to_string().contains("kernel k needs 2147483648 blocks"),
            "{err}"
        );
        assert!(grid_dim(usize::MAX, "k").is_err());
        assert!(grid_dim(1 << 32, "k").is_err(), "no truncation to 0");
    }

    #[test]
    fn tiling_puts_the_contiguous_factored_axis_on_x() {
        let t = Tiling::of(&crate::shape::Layout::new(
            Shape::parse("16x8x3x3").unwrap(),
        ));
        assert_eq!(
            (t.x_axis, t.y_axis, t.rest_axes.clone()),
            (Some(1), 0, vec![2, 3])
        );
        assert_eq!((t.nx, t.ny, t.rest_len, t.bx, t.by), (8, 16, 9, 8, 32));
        let t = Tiling::of(&crate::shape::Layout::new(Shape::parse("1x300").unwrap()));
        assert_eq!((t.x_axis, t.y_axis, t.nx, t.ny), (Some(1), 0, 300, 1));
    }
}
