//! Partitions a [`StepIr`] into CUDA kernels, generically over the IR (nothing here knows
//! what a feature is), rendering the target-independent [`PassPlan`] (levels, passes and
//! stages: see [`crate::plan`]).
//!
//! - **Elem kernels** (`E_k`) are the passes over the element data. A reduce pass computes,
//!   in registers, the operands of the element means it is given and writes their per-block
//!   partial sums (deterministic: fixed thread-to-element map, fixed-order trees). The last
//!   pass computes what the element-domain stores need and stores it.
//! - **Small kernels** (`S_k_i`) are the stages before `E_k`: they finish the element means
//!   reduced by the previous pass (fixed order), and compute the stage's nodes on the
//!   row/column/rest/step domains into a scratch arena. A stage is split into kernels of two
//!   kinds, alternating ([`KernelKind::Small`]): multi-block kernels computing nodes point by
//!   point, the points spread over at least [`SPREAD_BLOCKS`] blocks, and one-block kernels for
//!   the reductions onto few points, whose long sums a multi-block kernel first cuts into
//!   chunks ([`CHUNK_THRESHOLD`]). The last stage also performs the stores of those domains
//!   (the state buffers `fac_row`, `fac_col`), after every load of them.
//! - Constants and runtime scalars are inlined where they are used.

use crate::ir::{Op, StepIr, ValueId};
pub use crate::plan::{elem_closure, is_elem_mean, is_inlined, levels, PassPlan, StagePlan};
use crate::shape::Domain;
use std::collections::BTreeMap;

/// Threads of every block, elem or small.
pub const BLOCK_THREADS: usize = 256;
/// Rows of its tile each elem-kernel thread walks (caps the tile along the Y axis).
pub const ROWS_PER_THREAD: usize = 4;

/// The fewest blocks a multi-block small kernel of a big tensor ([`SPREAD_NUMEL`]) spreads a
/// domain of at least as many points over: 2 per SM of an H100 (132 SMs), so that no
/// small-domain work of a big tensor runs on a corner of the GPU (#12.2).
pub const SPREAD_BLOCKS: usize = 264;

/// Tensors of at least this many elements (2^20) spread their multi-block small kernels over
/// [`SPREAD_BLOCKS`]; smaller ones use one block per 256 points (their small domains have a few
/// thousand points at most, and a packed model runs every tensor's small kernels at once).
pub const SPREAD_NUMEL: usize = 1 << 20;

/// A mean computed by a one-block kernel (a step-domain element mean, or a small-domain mean
/// onto fewer than 64 points) that has more values than this to sum per lane and point is
/// finished in two levels: a multi-block small kernel sums them in fixed chunks, one block
/// per chunk, and the one-block kernel after it sums the chunk sums. At or below it, one
/// block sums the values itself (≤ 4 per thread, lane and point).
pub const CHUNK_THRESHOLD: usize = 4 * BLOCK_THREADS;

/// The largest domain a single-block small kernel computes pointwise nodes on (one point per
/// thread, no loop): bigger domains go to the multi-block kernels.
pub const BLOCK_POINTS: usize = BLOCK_THREADS;

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

/// How the element domain is cut into thread blocks. X is the factored axis with the smaller
/// stride (a virtual axis of size 1 for unfactored tensors) and Y the other one (the whole
/// tensor when unfactored). The rest axes (neither X nor Y) split in two: the **inner** ones,
/// after X in memory (smaller strides), and the **outer** ones. The tensor is viewed as
/// `[outer axes…] × Y × X'`, where `X' = (X, inner axes…)` flattened is contiguous (stride 1,
/// [`Tiling::row_len`] = `nx · inner_len` elements): threadIdx.x runs along X', so consecutive
/// threads of a warp touch consecutive floats for every rank. A block covers one outer rest
/// point and a `BY·J × BX` tile of `Y × X'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tiling {
    /// The factored axis with the smaller stride, or `None` (virtual axis of size 1).
    pub x_axis: Option<usize>,
    /// The tensor axis along threadIdx y (for rank ≤ 1 tensors: axis 0).
    pub y_axis: usize,
    /// The rest axes after X (in order): they run with X along threadIdx x.
    pub inner_axes: Vec<usize>,
    /// The rest axes before X (in order): one point of them per block.
    pub outer_axes: Vec<usize>,
    /// Size of X.
    pub nx: usize,
    /// Number of inner rest points (1 when there is no inner axis): the stride of X.
    pub inner_len: usize,
    /// Size of Y.
    pub ny: usize,
    /// Number of outer rest points.
    pub outer_len: usize,
    /// Threads along X' (a power of two ≤ 32).
    pub bx: usize,
    /// Threads along Y (`BLOCK_THREADS / bx`).
    pub by: usize,
    /// Rows of the tile each thread walks.
    pub rows_per_thread: usize,
    /// Tiles along X'.
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
        let rest = (0..dims.len()).filter(|&a| Some(a) != x_axis && a != y_axis);
        let (inner_axes, outer_axes): (Vec<usize>, Vec<usize>) =
            rest.partition(|&a| x_axis.is_some_and(|x| a > x));
        let nx = x_axis.map_or(1, |a| dims[a]);
        let inner_len: usize = inner_axes.iter().map(|&a| dims[a]).product();
        let ny = dims[y_axis];
        let outer_len = outer_axes.iter().map(|&a| dims[a]).product();
        let row_len = nx * inner_len;
        let bx = row_len.next_power_of_two().min(32);
        let by = BLOCK_THREADS / bx;
        let rows_per_thread = ny.div_ceil(by).clamp(1, ROWS_PER_THREAD);
        Tiling {
            x_axis,
            y_axis,
            inner_axes,
            outer_axes,
            nx,
            inner_len,
            ny,
            outer_len,
            bx,
            by,
            rows_per_thread,
            tiles_x: row_len.div_ceil(bx),
            tiles_y: ny.div_ceil(by * rows_per_thread),
        }
    }

    /// Length of X' = (X, inner axes): the contiguous run of elements along threadIdx x.
    pub fn row_len(&self) -> usize {
        self.nx * self.inner_len
    }

    /// Blocks of an elem kernel.
    pub fn blocks(&self) -> usize {
        self.outer_len * self.tiles_x * self.tiles_y
    }

    /// Blocks per outer rest point.
    pub fn blocks_per_rest(&self) -> usize {
        self.tiles_x * self.tiles_y
    }

    /// Row-major strides of Y and of the outer axes in the element domain (X' has stride 1):
    /// element `e = ix + iy · stride_y + Σ c_a · stride_a` for X' index `ix`, Y index `iy` and
    /// outer coordinates `c_a`.
    pub fn strides(&self, layout: &crate::shape::Layout) -> (usize, Vec<(usize, usize)>) {
        let dims = layout.dims();
        let stride = |a: usize| dims[a + 1..].iter().product::<usize>();
        (
            stride(self.y_axis),
            self.outer_axes.iter().map(|&a| (a, stride(a))).collect(),
        )
    }

    /// Heads of a row segment for a mean that reduces X but keeps the inner axes: the first
    /// `min(inner_len, bx)` threads of each row of a tile, one per inner point met in the
    /// tile, each summing the threads `inner_len` apart from it.
    pub fn heads(&self) -> usize {
        self.inner_len.min(self.bx)
    }

    /// Partial slots per tile row for a mean that reduces X but keeps the inner axes: one per
    /// X' tile when every tile meets every inner point (`inner_len ≤ bx`), else one per index
    /// along X (each thread of a tile is then alone with its inner point).
    pub fn x_slots(&self) -> usize {
        if self.inner_len <= self.bx {
            self.tiles_x
        } else {
            self.nx
        }
    }

    /// The element that thread `tid` of block `blk` handles in row `j` of its tile, or `None`
    /// past the tensor's edge: the map the elem kernels use (`templates/elem_kernel.cu.j2`).
    pub fn element(
        &self,
        layout: &crate::shape::Layout,
        blk: usize,
        tid: usize,
        j: usize,
    ) -> Option<usize> {
        let (tx, ty) = (tid % self.bx, tid / self.bx);
        let txt = blk % self.tiles_x;
        let tyt = (blk / self.tiles_x) % self.tiles_y;
        let mut rest = blk / self.blocks_per_rest();
        let ix = txt * self.bx + tx;
        let iy = (tyt * self.rows_per_thread + j) * self.by + ty;
        if ix >= self.row_len() || iy >= self.ny || rest >= self.outer_len {
            return None;
        }
        let (sy, outer) = self.strides(layout);
        let mut e = ix + iy * sy;
        for &(a, s) in outer.iter().rev() {
            let d = layout.dims()[a];
            e += (rest % d) * s;
            rest /= d;
        }
        Some(e)
    }
}

/// How the per-block partial sums of an element mean are laid out (f64, in the partials
/// arena), and how many of them make up one output point. `points` are the mean's target
/// points in domain order; a kept point of a thread is found from its coordinates (X and the
/// inner axes from its X' index, the outer axes from its block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartialKind {
    /// The mean keeps X (and every rest axis) and reduces Y: `[tiles_y][points][width]`, each
    /// thread's X' index one kept point.
    KeepX,
    /// The mean keeps Y (and every rest axis) and reduces X: `[x_slots][points][width]`
    /// ([`Tiling::x_slots`]); in each row of a tile the threads of one inner point (`inner_len`
    /// apart along X') are summed by a fixed shuffle tree into the first of them.
    KeepY,
    /// The mean keeps the rest axes and reduces X and Y, with inner axes (`inner_len > 1`):
    /// `[tiles_y][x_slots][points][width]`, the threads of one inner point summed as for
    /// `KeepY`, then over the block's rows as for `KeepX`.
    KeepInner,
    /// The mean reduces X and Y and keeps at most the outer rest axes (rest or step target,
    /// one point per block): one value per block, `[blocks][width]`; blocks of one rest point
    /// are contiguous.
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
    /// Part of a stage: the small-domain nodes in `nodes` (topological order; element means
    /// among them are finished from their partials or chunk sums), then the small-domain
    /// `stores`. With `blocks == 1` the kernel is one block whose threads meet at barriers
    /// between nodes (reductions onto few points, the final sums of chunked means, pointwise
    /// nodes on at most [`BLOCK_POINTS`] points). With `blocks > 1` every node is computed
    /// point by point from values of its own point or of earlier kernels, one thread per point,
    /// the points of each domain spread over all the blocks (no barrier between nodes), and
    /// each block first sums its chunk of the values of the means in `chunked`.
    Small {
        /// Nodes computed into scratch.
        nodes: Vec<ValueId>,
        /// Store nodes performed at the end.
        stores: Vec<ValueId>,
        /// Blocks of the launch.
        blocks: usize,
        /// Means whose chunk sums this kernel computes (one chunk per block), finished by the
        /// next kernel of the stage ([`CHUNK_THRESHOLD`]).
        chunked: Vec<ValueId>,
        /// A round-out kernel of a staged schedule: `nodes` are cross means, summed over the
        /// shard into this round's buffer instead of divided into scratch.
        round_out: Option<usize>,
    },
}

/// One kernel of the step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// Entry name in the PTX.
    pub name: String,
    /// The stage it belongs to (0 unless the schedule is staged: [`schedule_staged`]).
    pub stage: u32,
    /// The level it belongs to (within its stage).
    pub level: u32,
    /// Its place among the small kernels of its stage (0 for elem kernels).
    pub phase: u32,
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
    /// The means finished in two levels: for each, the number of chunks (the blocks of the
    /// multi-block kernel summing one chunk per block) and the offset of the chunk sums in the
    /// f64 arena (`[chunks][points][width]`).
    pub chunks: BTreeMap<ValueId, (usize, usize)>,
    /// Number of passes over the element data.
    pub elem_passes: usize,
    /// Staged schedules ([`schedule_staged`]): the length (f64 values) of this shard's buffer
    /// of every round. Empty otherwise.
    pub round_len: Vec<usize>,
    /// Staged schedules: every cross mean's slot in its round's buffer.
    pub round_of: BTreeMap<ValueId, RoundSlot>,
}

impl Schedule {
    /// Number of rounds (combines of partial sums across shards) of a staged schedule; 0 for
    /// an unstaged one.
    pub fn rounds(&self) -> usize {
        self.round_len.len()
    }
}

/// Schedules `ir` into kernels (see the module documentation).
pub fn schedule(ir: &StepIr) -> Schedule {
    let spread = if ir.layout.numel() >= SPREAD_NUMEL {
        SPREAD_BLOCKS
    } else {
        1
    };
    schedule_with(ir, CHUNK_THRESHOLD, spread)
}

/// [`schedule`] with one-block means chunked above `chunk_threshold` values per lane and
/// point instead of [`CHUNK_THRESHOLD`], and multi-block small kernels spread over at least
/// `spread` blocks (where a domain has as many points) instead of [`SPREAD_BLOCKS`] or 1 (the
/// emulation tests chunk small tensors' means, and spread their points over a few blocks, to
/// check those paths).
pub fn schedule_with(ir: &StepIr, chunk_threshold: usize, spread: usize) -> Schedule {
    let plan = PassPlan::of(ir);
    let max_level = plan.last;
    let groups: Vec<Group> = (0..=max_level)
        .map(|k| {
            let last = k == max_level;
            Group {
                stage: 0,
                level: k,
                small: plan.stage_nodes(ir, k),
                stores: if last {
                    plan.small_stores.clone()
                } else {
                    Vec::new()
                },
                pass: (last || !plan.pass_means[k as usize].is_empty())
                    .then(|| plan.pass_means[k as usize].clone()),
                last,
                round_out: None,
            }
        })
        .collect();
    build(
        ir,
        groups,
        Rounds::default(),
        plan.levels,
        chunk_threshold,
        spread,
    )
}

/// The staged schedule of one rank's shard of a tensor split by rows of axis 0 (FSDP's
/// `Shard(0)`), rendering the [`StagePlan`] of `global` (the whole tensor's program) on
/// `local` (the same program with the shard's layout: [`crate::shape::Layout`]'s local rows).
///
/// The kernels run stage by stage ([`Kernel::stage`]). Within a stage they are those of
/// [`schedule`] for the stage's levels: small kernels of `(stage, level)`, then its pass over
/// the shard's elements. A stage before the last ends with **round-out** kernels
/// ([`KernelKind::Small::round_out`]): every cross mean of the round (a mean over axis 0)
/// summed over the shard, as the mean would be computed but not divided, into the round's
/// buffer (`mulo_round<r>`, f64, [`Schedule::round_of`]: `[point][lane]` at the mean's
/// offset). The host adds every rank's buffer of that round; the next stage finishes each
/// cross mean from the combined sums, divided by the **whole** tensor's count. Every other mean
/// keeps its local count, which is the whole tensor's: it does not sum along axis 0.
pub fn schedule_staged(global: &StepIr, local: &StepIr) -> Schedule {
    let spread = if global.layout.numel() >= SPREAD_NUMEL {
        SPREAD_BLOCKS
    } else {
        1
    };
    schedule_staged_with(global, local, CHUNK_THRESHOLD, spread)
}

/// [`schedule_staged`] with the chunking and spread of [`schedule_with`].
pub fn schedule_staged_with(
    global: &StepIr,
    local: &StepIr,
    chunk_threshold: usize,
    spread: usize,
) -> Schedule {
    let stages = StagePlan::of(global, Some(0));
    let rounds = stages.rounds() as u32;
    let small_stores: Vec<ValueId> = local
        .ids()
        .filter(|&v| {
            let node = local.node(v);
            node.domain != Domain::Elem && matches!(node.op, Op::Store { .. })
        })
        .collect();
    let mut groups = Vec::new();
    for s in 0..=rounds {
        let top = stages.max_level(s);
        for l in 0..=top {
            let pass = stages
                .passes
                .iter()
                .find(|p| p.stage == s && p.level == l)
                .map(|p| p.means.clone());
            let last = s == rounds && l == top;
            groups.push(Group {
                stage: s,
                level: l,
                small: stages
                    .small_nodes(local, s, l)
                    .into_iter()
                    .filter(|&v| !is_inlined(&local.node(v).op))
                    .collect(),
                stores: if last {
                    small_stores.clone()
                } else {
                    Vec::new()
                },
                pass,
                last,
                round_out: None,
            });
        }
        if s < rounds {
            groups.push(Group {
                stage: s,
                level: top + 1,
                small: stages.round_means[s as usize].clone(),
                stores: Vec::new(),
                pass: None,
                last: false,
                round_out: Some(s as usize),
            });
        }
    }
    let mut round_of = BTreeMap::new();
    let mut round_len = Vec::with_capacity(stages.rounds());
    for r in 0..stages.rounds() {
        let (slots, len) = stages.round_slots(global, r);
        for (m, offset) in slots {
            let node = global.node(m);
            let from = global.node(node.op.operands()[0]).domain;
            let layout = &global.layout;
            round_of.insert(
                m,
                RoundSlot {
                    round: r,
                    offset,
                    count: layout.mean_count(from, node.domain),
                },
            );
        }
        round_len.push(len);
    }
    build(
        local,
        groups,
        Rounds {
            len: round_len,
            of: round_of,
        },
        levels(local),
        chunk_threshold,
        spread,
    )
}

/// A cross mean's place in a round buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundSlot {
    /// The round whose buffer holds its sums.
    pub round: usize,
    /// Offset of its `[point][lane]` sums in that buffer (f64 values).
    pub offset: usize,
    /// The whole tensor's count of terms per point: the combined sums are divided by it.
    pub count: usize,
}

/// The rounds of a staged schedule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Rounds {
    len: Vec<usize>,
    of: BTreeMap<ValueId, RoundSlot>,
}

/// The work of one `(stage, level)` of a plan, before it is split into kernels.
struct Group {
    stage: u32,
    level: u32,
    /// Small-domain nodes, topological order (not inlined, not stores).
    small: Vec<ValueId>,
    /// Small-domain stores.
    stores: Vec<ValueId>,
    /// The pass after the small kernels, with the element means it reduces (`None`: no pass).
    pass: Option<Vec<ValueId>>,
    /// Whether the pass is the last, performing the element stores.
    last: bool,
    /// A round-out group: `small` are the cross means of this round, summed into its buffer.
    round_out: Option<usize>,
}

/// Lays out scratch and partials and splits `groups` into kernels.
fn build(
    ir: &StepIr,
    groups: Vec<Group>,
    rounds: Rounds,
    node_levels: Vec<u32>,
    chunk_threshold: usize,
    spread: usize,
) -> Schedule {
    let layout = &ir.layout;
    let tiling = Tiling::of(layout);

    // Scratch offsets for the materialized small nodes: every small node a group computes.
    let mut computed = vec![false; ir.nodes.len()];
    for g in &groups {
        for &v in &g.small {
            computed[v.index()] = true;
        }
    }
    let mut scratch_offset = vec![None; ir.nodes.len()];
    let mut scratch_len = 0usize;
    for (i, node) in ir.nodes.iter().enumerate() {
        if computed[i] && !matches!(node.op, Op::Store { .. }) {
            scratch_offset[i] = Some(scratch_len);
            scratch_len += layout.domain_len(node.domain) * node.width as usize;
        }
    }
    // Partials for the element means, in pass order.
    let mut partials_len = 0usize;
    let mut means: BTreeMap<ValueId, ElemMean> = BTreeMap::new();
    for &m in groups.iter().filter_map(|g| g.pass.as_ref()).flatten() {
        let node = ir.node(m);
        let axes = layout.domain_axes(node.domain);
        let keeps = |a: Option<usize>| a.is_some_and(|a| axes.contains(&a));
        let (kind, tiles) = if keeps(tiling.x_axis) {
            (PartialKind::KeepX, tiling.tiles_y)
        } else if axes.contains(&tiling.y_axis) {
            (PartialKind::KeepY, tiling.x_slots())
        } else if tiling.inner_len > 1 && tiling.inner_axes.iter().any(|a| axes.contains(a)) {
            (PartialKind::KeepInner, tiling.tiles_y * tiling.x_slots())
        } else {
            (PartialKind::Blocks, tiling.blocks())
        };
        let count = match kind {
            PartialKind::Blocks => tiles,
            _ => tiles * layout.domain_len(node.domain),
        };
        means.insert(
            m,
            ElemMean {
                node: m,
                operand: node.op.operands()[0],
                kind,
                partial_offset: partials_len,
                partials_per_point: match kind {
                    PartialKind::Blocks => tiling.blocks() / layout.domain_len(node.domain).max(1),
                    _ => tiles,
                },
            },
        );
        partials_len += count * node.width as usize;
    }

    // The small kernels of every group, then the chunk sums they need.
    let phases: Vec<Vec<SmallPhase>> = groups
        .iter()
        .map(|g| {
            let ctx = Ctx {
                ir,
                means: &means,
                from_round: if g.round_out.is_some() {
                    None
                } else {
                    Some(&rounds.of)
                },
            };
            stage_phases(&ctx, &g.small, &g.stores, chunk_threshold, spread)
        })
        .collect();
    let mut chunks = BTreeMap::new();
    for phase in phases.iter().flatten() {
        for &m in &phase.chunked {
            let node = ir.node(m);
            chunks.insert(m, (phase.blocks, partials_len));
            partials_len += phase.blocks * layout.domain_len(node.domain) * node.width as usize;
        }
    }

    let staged = !rounds.len.is_empty();
    let prefix = |stage: u32| {
        if staged {
            format!("mulo_s{stage}_")
        } else {
            "mulo_".to_string()
        }
    };
    let mut kernels = Vec::new();
    let mut elem_passes = 0;
    for (g, group_phases) in groups.iter().zip(phases) {
        let (k, pre) = (g.level, prefix(g.stage));
        for (i, phase) in group_phases.into_iter().enumerate() {
            kernels.push(Kernel {
                name: match g.round_out {
                    Some(r) => format!("{pre}round{r}_out_{i}"),
                    None => format!("{pre}small_{k}_{i}"),
                },
                stage: g.stage,
                level: k,
                phase: i as u32,
                kind: KernelKind::Small {
                    nodes: phase.nodes,
                    stores: phase.stores,
                    blocks: phase.blocks,
                    chunked: phase.chunked,
                    round_out: g.round_out,
                },
            });
        }
        let Some(pass) = &g.pass else {
            continue;
        };
        let pass_means: Vec<ElemMean> = pass.iter().map(|m| means[m].clone()).collect();
        kernels.push(Kernel {
            name: if g.last {
                format!("{pre}elem_{k}_update")
            } else {
                format!("{pre}elem_{k}_reduce")
            },
            stage: g.stage,
            level: k,
            phase: 0,
            kind: KernelKind::Elem {
                means: pass_means,
                stores: g.last,
            },
        });
        elem_passes += 1;
    }
    Schedule {
        kernels,
        levels: node_levels,
        tiling,
        scratch_offset,
        scratch_len,
        partials_len,
        chunks,
        elem_passes,
        round_len: rounds.len,
        round_of: rounds.of,
    }
}

/// One small kernel of a stage, before naming.
struct SmallPhase {
    nodes: Vec<ValueId>,
    stores: Vec<ValueId>,
    blocks: usize,
    chunked: Vec<ValueId>,
}

/// Where a small node may be computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Point by point over many blocks.
    Points,
    /// In one block (a reduction onto few points).
    Block,
    /// Either (pointwise work on at most [`BLOCK_POINTS`] points).
    Either,
}

/// What the kernel split of a group needs to know about its nodes.
struct Ctx<'a> {
    ir: &'a StepIr,
    means: &'a BTreeMap<ValueId, ElemMean>,
    /// Cross means finished from a round's combined sums (not in a round-out group).
    from_round: Option<&'a BTreeMap<ValueId, RoundSlot>>,
}

impl Ctx<'_> {
    /// Whether `v` is finished from its round's combined sums: read and divided point by point.
    fn finishes_from_round(&self, v: ValueId) -> bool {
        self.from_round.is_some_and(|r| r.contains_key(&v))
    }
}

fn mode(ctx: &Ctx<'_>, v: ValueId) -> Mode {
    let (ir, means) = (ctx.ir, ctx.means);
    let node = ir.node(v);
    let n = ir.layout.domain_len(node.domain);
    if ctx.finishes_from_round(v) {
        return if n > BLOCK_POINTS {
            Mode::Points
        } else {
            Mode::Either
        };
    }
    match &node.op {
        Op::Mean(a) if ir.node(*a).domain == Domain::Elem => match means.get(&v).map(|m| m.kind) {
            Some(PartialKind::Blocks) if n == 1 => Mode::Block,
            _ => Mode::Points,
        },
        // As `render` computes them: a thread per point for many points, else a block per
        // point.
        Op::Mean(_) if n >= 64 => Mode::Points,
        Op::Mean(_) => Mode::Block,
        _ if n > BLOCK_POINTS => Mode::Points,
        _ => Mode::Either,
    }
}

/// Whether the one-block mean `v` is finished in two levels: more than `threshold` values
/// per lane and point to sum (the partials of a step mean, or the operand points of a small
/// mean onto fewer than 64 points).
fn chunked(ctx: &Ctx<'_>, v: ValueId, threshold: usize) -> bool {
    if mode(ctx, v) != Mode::Block {
        return false;
    }
    let ir = ctx.ir;
    let layout = &ir.layout;
    match (&ir.node(v).op, ctx.means.get(&v)) {
        (_, Some(m)) => m.partials_per_point > threshold,
        (Op::Mean(a), None) => layout.mean_count(ir.node(*a).domain, ir.node(v).domain) > threshold,
        _ => false,
    }
}

/// Whether `v`, computed at its point by one thread, reads `o` at other points (so that `o`
/// must be complete, at every point, before `v` starts).
fn reads_across(ir: &StepIr, v: ValueId, o: ValueId) -> bool {
    matches!(ir.node(v).op, Op::Mean(_)) || ir.node(v).domain != ir.node(o).domain
}

/// Splits a stage into kernels. Phase `q` is a multi-block kernel for even `q`, a one-block
/// kernel for odd `q`; every node goes to the first phase of a mode it allows at which its
/// operands of this stage are ready: computed by an earlier phase, or by the same one when
/// that is a block (barriers between nodes) or when they are of its own point (the same
/// thread). Stores come after the loads of their buffer. A step mean with more than
/// `chunk_threshold` partials per lane is chunked by the multi-block phase before its own.
fn stage_phases(
    ctx: &Ctx<'_>,
    nodes: &[ValueId],
    stores: &[ValueId],
    chunk_threshold: usize,
    spread: usize,
) -> Vec<SmallPhase> {
    let ir = ctx.ir;
    let layout = &ir.layout;
    let mut phase: BTreeMap<ValueId, usize> = BTreeMap::new();
    let is_block = |q: usize| q % 2 == 1;
    let place = |v: ValueId, deps: &[ValueId], phase: &BTreeMap<ValueId, usize>| -> usize {
        let m = mode(ctx, v);
        // Its chunks are summed by the phase before its own, across points.
        let lead = usize::from(chunked(ctx, v, chunk_threshold));
        let deps: Vec<(ValueId, usize)> = deps
            .iter()
            .filter_map(|o| phase.get(o).map(|&q| (*o, q)))
            .collect();
        let mut q = deps.iter().map(|d| d.1).max().unwrap_or(0);
        loop {
            let mode_ok = match m {
                Mode::Points => !is_block(q),
                Mode::Block => is_block(q),
                Mode::Either => true,
            };
            let ready = deps.iter().all(|&(o, qo)| {
                qo + lead < q || (lead == 0 && (is_block(q) || !reads_across(ir, v, o)))
            });
            if mode_ok && ready {
                return q;
            }
            q += 1;
        }
    };
    for &v in nodes {
        let q = place(v, &ir.node(v).op.operands(), &phase);
        phase.insert(v, q);
    }
    let mut store_phase: Vec<(ValueId, usize)> = Vec::new();
    for &v in stores {
        let Op::Store { buffer, value, .. } = &ir.node(v).op else {
            continue;
        };
        let mut deps = vec![*value];
        deps.extend(
            nodes
                .iter()
                .copied()
                .filter(|&l| matches!(ir.node(l).op, Op::Load { buffer: b, .. } if b == *buffer)),
        );
        store_phase.push((v, place(v, &deps, &phase)));
    }
    let mut chunk_at: BTreeMap<usize, Vec<ValueId>> = BTreeMap::new();
    for (&v, &q) in &phase {
        if chunked(ctx, v, chunk_threshold) {
            chunk_at.entry(q - 1).or_default().push(v);
        }
    }
    let phases = phase
        .values()
        .chain(store_phase.iter().map(|s| &s.1))
        .chain(chunk_at.keys())
        .max()
        .map_or(0, |q| q + 1);
    (0..phases)
        .filter_map(|q| {
            let nodes: Vec<ValueId> = nodes.iter().copied().filter(|v| phase[v] == q).collect();
            let stores: Vec<ValueId> = store_phase
                .iter()
                .filter(|s| s.1 == q)
                .map(|s| s.0)
                .collect();
            let chunked = chunk_at.remove(&q).unwrap_or_default();
            if nodes.is_empty() && stores.is_empty() && chunked.is_empty() {
                return None;
            }
            let blocks = if is_block(q) {
                1
            } else {
                let points = nodes
                    .iter()
                    .chain(&stores)
                    .map(|&v| {
                        let n = layout.domain_len(ir.node(v).domain);
                        n.div_ceil(BLOCK_THREADS).max(n.min(spread))
                    })
                    .max()
                    .unwrap_or(1);
                if chunked.is_empty() {
                    points.max(1)
                } else if spread > 1 {
                    points.max(spread)
                } else {
                    // A small tensor's long mean (a skinny one's rows): chunked over the GPU
                    // all the same.
                    points.max(SPREAD_BLOCKS)
                }
            };
            Some(SmallPhase {
                nodes,
                stores,
                blocks,
                chunked,
            })
        })
        .collect()
}

/// How a multi-block small kernel of `blocks` blocks spreads the `n` points of a domain:
/// runs of `c` consecutive points (the largest of 8, 4, 2, 1 leaving at least one run per
/// block), run `r` in block `r % blocks`. Point `p` of thread `tid` of block `blk` is
/// `tid % c + c · (blk + blocks · (tid / c))`: every point once, the points of a domain of at
/// least `blocks` points in every block, and up to 8 consecutive points (32 bytes) per warp
/// access.
pub fn spread_run(n: usize, blocks: usize) -> usize {
    let mut c = 8;
    while c > 1 && n.div_ceil(c) < blocks {
        c /= 2;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lopt::LearnedOptimizer;
    use crate::shape::Shape;
    use std::collections::BTreeSet;

    fn sched(shape: &str) -> Schedule {
        let ir =
            crate::compile_step(&Shape::parse(shape).unwrap(), &LearnedOptimizer::demo()).unwrap();
        schedule(&ir)
    }

    /// The kernels of `s`, small kernels of one stage as `mulo_small_{k}`.
    fn stages(s: &Schedule) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for k in &s.kernels {
            let name = match k.kind {
                KernelKind::Small { .. } => format!("mulo_small_{}", k.level),
                _ => k.name.clone(),
            };
            if out.last() != Some(&name) {
                out.push(name);
            }
        }
        out
    }

    #[test]
    fn factored_needs_three_elem_passes() {
        let s = sched("64x32");
        assert_eq!(s.elem_passes, 3);
        assert_eq!(
            stages(&s),
            [
                "mulo_elem_0_reduce",
                "mulo_small_1",
                "mulo_elem_1_reduce",
                "mulo_small_2",
                "mulo_elem_2_update"
            ]
        );
        let elem: Vec<&Kernel> = s
            .kernels
            .iter()
            .filter(|k| matches!(k.kind, KernelKind::Elem { .. }))
            .collect();
        // Pass 0 reduces q over d0 and over d1 (two means), pass 1 the 16 element features².
        let means = |k: usize| match &elem[k].kind {
            KernelKind::Elem { means, .. } => means.len(),
            _ => unreachable!(),
        };
        assert_eq!(means(0), 2);
        assert_eq!(means(1), 16);
        // The row/column accumulators are stored by the last stage's small kernels.
        let stores: usize = s
            .kernels
            .iter()
            .filter(|k| k.level == 2)
            .map(|k| match &k.kind {
                KernelKind::Small { stores, .. } => stores.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(stores, 6);
    }

    #[test]
    fn unfactored_needs_two_elem_passes() {
        for shape in ["37", "1", "scalar"] {
            let s = sched(shape);
            assert_eq!(s.elem_passes, 2, "{shape}");
            assert_eq!(
                stages(&s),
                ["mulo_elem_0_reduce", "mulo_small_1", "mulo_elem_1_update"],
                "{shape}"
            );
        }
    }

    /// The staged schedule of a shard: the stages of the plan, every cross mean summed into
    /// its round by a round-out kernel at the end of the stage before its own and finished from
    /// the round in its own stage; no pass over the elements beyond the unsharded step's.
    #[test]
    fn staged_schedules_sum_cross_means_into_rounds() {
        let lopt = LearnedOptimizer::demo();
        for (shape, rows) in [("64x32", 20), ("37", 5), ("16x8x3x3", 3), ("64x32", 0)] {
            let global = crate::compile_step(&Shape::parse(shape).unwrap(), &lopt).unwrap();
            let local = StepIr {
                layout: global.layout.with_local_rows(rows),
                ..global.clone()
            };
            let plan = StagePlan::of(&global, Some(0));
            let s = schedule_staged(&global, &local);
            assert_eq!(s.rounds(), plan.rounds(), "{shape}");
            assert_eq!(s.elem_passes, schedule(&global).elem_passes, "{shape}");
            // Kernels run stage by stage; each stage before the last ends with its round-out.
            let stages: Vec<u32> = s.kernels.iter().map(|k| k.stage).collect();
            assert!(
                stages.windows(2).all(|w| w[0] <= w[1]),
                "{shape}: {stages:?}"
            );
            assert_eq!(*stages.last().unwrap() as usize, plan.rounds());
            for r in 0..plan.rounds() {
                let (slots, len) = plan.round_slots(&global, r);
                assert_eq!(s.round_len[r], len, "{shape} round {r}");
                let outs: Vec<&Kernel> = s
                    .kernels
                    .iter()
                    .filter(|k| matches!(k.kind, KernelKind::Small { round_out: Some(q), .. } if q == r))
                    .collect();
                assert!(outs.iter().all(|k| k.stage as usize == r));
                let last_of_stage = s
                    .kernels
                    .iter()
                    .rposition(|k| k.stage as usize == r)
                    .unwrap();
                assert_eq!(s.kernels[last_of_stage].name, outs.last().unwrap().name);
                for (m, offset) in slots {
                    assert_eq!(s.round_of[&m].offset, offset);
                    assert_eq!(s.round_of[&m].round, r);
                    let summed = outs
                        .iter()
                        .filter(|k| matches!(&k.kind, KernelKind::Small { nodes, .. } if nodes.contains(&m)))
                        .count();
                    assert_eq!(summed, 1, "{shape}: {m} summed into round {r} once");
                    let finished: Vec<&Kernel> = s
                        .kernels
                        .iter()
                        .filter(|k| matches!(&k.kind, KernelKind::Small { nodes, round_out: None, .. } if nodes.contains(&m)))
                        .collect();
                    assert_eq!(finished.len(), 1, "{shape}: {m} finished once");
                    assert_eq!(finished[0].stage as usize, r + 1);
                    // Divided by the whole tensor's count, not the shard's.
                    let node = global.node(m);
                    let from = global.node(node.op.operands()[0]).domain;
                    assert_eq!(
                        s.round_of[&m].count,
                        global.layout.mean_count(from, node.domain)
                    );
                }
            }
        }
    }

    #[test]
    fn small_kernels_of_big_tensors_spread_over_the_gpu() {
        // 4096x1024: the per-row and per-column work (the first layer's row and column parts,
        // ~1 M multiply-adds) runs on multi-block kernels; a one-block kernel computes only
        // step and rest nodes and the final sums of means (chunked where they are long).
        let s = sched("4096x1024");
        let ir = crate::compile_step(
            &Shape::parse("4096x1024").unwrap(),
            &LearnedOptimizer::demo(),
        )
        .unwrap();
        let mut dense_rows = 0;
        for k in &s.kernels {
            let KernelKind::Small { nodes, blocks, .. } = &k.kind else {
                continue;
            };
            for &v in nodes {
                let n = ir.layout.domain_len(ir.node(v).domain);
                if *blocks == 1 {
                    assert!(n <= BLOCK_POINTS, "{}: {v} on {n} points", k.name);
                } else if matches!(ir.node(v).op, Op::Dense { .. }) && n > BLOCK_POINTS {
                    assert!(*blocks >= SPREAD_BLOCKS, "{}", k.name);
                    dense_rows += n;
                }
            }
        }
        assert_eq!(dense_rows, 4096 + 1024, "the row and column input layers");
        // Chunked: the 16 feature means of pass 1 (4096 partials each) and the means over the
        // 4096 columns.
        assert!(s.chunks.len() >= 16, "{:?}", s.chunks);
        assert!(s.chunks.values().all(|&(g, _)| g >= SPREAD_BLOCKS));
    }

    #[test]
    fn spread_runs_cover_every_point_once() {
        for (n, blocks) in [
            (4096, 264),
            (1024, 264),
            (70, 70),
            (1, 1),
            (300, 264),
            (5000, 264),
        ] {
            let c = spread_run(n, blocks);
            let mut seen = vec![0u8; n];
            for blk in 0..blocks {
                for tid in 0..BLOCK_THREADS {
                    let p = tid % c + c * (blk + blocks * (tid / c));
                    if p < n {
                        seen[p] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&x| x == 1), "{n} over {blocks}");
            if n >= 8 * blocks {
                assert_eq!(c, 8);
            }
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
            (
                t.x_axis,
                t.y_axis,
                t.inner_axes.clone(),
                t.outer_axes.clone()
            ),
            (Some(1), 0, vec![2, 3], vec![])
        );
        // X' = (axis 1, axes 2, 3): 72 contiguous floats, 32 threads along them.
        assert_eq!(
            (
                t.nx,
                t.inner_len,
                t.row_len(),
                t.ny,
                t.outer_len,
                t.bx,
                t.by
            ),
            (8, 9, 72, 16, 1, 32, 8)
        );
        let t = Tiling::of(&crate::shape::Layout::new(Shape::parse("1x300").unwrap()));
        assert_eq!((t.x_axis, t.y_axis, t.nx, t.ny), (Some(1), 0, 300, 1));
    }

    /// The layout of `shape`, factored on `axes` when given.
    fn layout(shape: &str, axes: Option<(usize, usize)>) -> crate::shape::Layout {
        let shape = Shape::parse(shape).unwrap();
        let axes = axes.map(|(d0, d1)| crate::shape::FactoredAxes { d0, d1 });
        crate::shape::Layout::with_axes(shape, axes).unwrap()
    }

    /// For every shape class (0-d, 1-d, 2-d both orientations, tall and wide, rank 3 with and
    /// without an inner axis, rank 4 factored on (0,1), (0,2), (0,3), (2,3) and (3,0), an inner run longer
    /// than a warp, tied axes given explicitly): the elem kernels' threads cover every element once, and consecutive
    /// threadIdx.x of a warp handle consecutive (stride-1) elements, except where a row
    /// segment of `bx` threads ends.
    #[test]
    fn consecutive_threads_touch_consecutive_elements_for_every_rank() {
        let cases: [(&str, Option<(usize, usize)>); 19] = [
            ("scalar", None),
            ("1", None),
            ("37", None),
            ("64x32", None),
            ("32x64", None),
            ("48x48", Some((0, 1))),
            ("48x48", Some((1, 0))),
            ("1x300", None),
            ("300x1", None),
            ("4096x4", None),
            ("5x7x3", None),
            ("3x1x40", None),
            ("16x8x3x3", None),
            ("64x3x7x7", Some((0, 2))),
            ("64x3x7x7", Some((0, 3))),
            ("7x3x7x7", Some((2, 3))),
            ("7x3x7x7", Some((3, 0))),
            ("9x8x6x6", None),
            ("2x3x4x5", None),
        ];
        for (shape, axes) in cases {
            check_threads_along_the_contiguous_axis(&layout(shape, axes));
        }
        // Every rank-3 and rank-4 shape over sizes 1, 2, 3, 5, 40 (up to 20,000 elements), with
        // every valid choice of factored axes.
        let sizes = [1, 2, 3, 5, 40];
        let mut checked = 0;
        for rank in 3..=4u32 {
            for code in 0..sizes.len().pow(rank) {
                let dims: Vec<usize> = (0..rank as usize)
                    .map(|k| sizes[code / sizes.len().pow(k as u32) % sizes.len()])
                    .collect();
                if dims.iter().product::<usize>() > 20_000 {
                    continue;
                }
                for d0 in 0..dims.len() {
                    for d1 in 0..dims.len() {
                        let axes = crate::shape::FactoredAxes { d0, d1 };
                        if axes.check(&dims).is_err() {
                            continue;
                        }
                        let shape = Shape::new(dims.clone()).unwrap();
                        let layout = crate::shape::Layout::with_axes(shape, Some(axes)).unwrap();
                        check_threads_along_the_contiguous_axis(&layout);
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 500, "{checked}");
    }

    /// The elem kernels' threads of `layout` cover every element once, and neighbours along
    /// threadIdx.x within a row segment handle neighbouring elements.
    fn check_threads_along_the_contiguous_axis(layout: &crate::shape::Layout) {
        let t = Tiling::of(layout);
        let what = format!("{layout}: {t:?}");
        let mut seen = vec![0u8; layout.numel()];
        let mut strided = 0;
        for blk in 0..t.blocks() {
            for j in 0..t.rows_per_thread {
                let e: Vec<Option<usize>> = (0..BLOCK_THREADS)
                    .map(|tid| t.element(layout, blk, tid, j))
                    .collect();
                for (tid, &ei) in e.iter().enumerate() {
                    if let Some(ei) = ei {
                        seen[ei] += 1;
                    }
                    let next = tid + 1;
                    if next % 32 == 0 || (t.bx > 1 && next % t.bx == 0) {
                        continue; // the warp or the row segment ends
                    }
                    if let (Some(a), Some(b)) = (ei, e[next]) {
                        assert_eq!(b, a + 1, "{what}: blk {blk} tid {tid} j {j}");
                        strided += 1;
                    }
                }
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "{what}: coverage {seen:?}");
        // Every warp's neighbours were checked somewhere (not vacuous).
        assert!(strided > 0 || layout.numel() == 1, "{what}");
        // The x threads run along the axis of stride 1: the last one of the tensor.
        if layout.dims().len() > 1 {
            assert_eq!(t.bx, t.row_len().next_power_of_two().min(32), "{what}");
            let contiguous = t.x_axis == Some(layout.dims().len() - 1)
                || t.inner_axes.last() == Some(&(layout.dims().len() - 1));
            assert!(contiguous, "{what}");
        }
    }

    /// The 32-byte sectors a warp's f32 load touches in an elem kernel of `layout`, summed over
    /// every warp load with an active lane (one per warp, block and row of the tile): (loads,
    /// sectors, the fewest sectors as many floats can occupy).
    fn warp_sectors(layout: &crate::shape::Layout) -> (usize, usize, usize) {
        let t = Tiling::of(layout);
        let (mut loads, mut sectors, mut ideal) = (0, 0, 0);
        for blk in 0..t.blocks() {
            for j in 0..t.rows_per_thread {
                for w in 0..BLOCK_THREADS / 32 {
                    let e: BTreeSet<usize> = (32 * w..32 * w + 32)
                        .filter_map(|tid| t.element(layout, blk, tid, j))
                        .collect();
                    if e.is_empty() {
                        continue;
                    }
                    loads += 1;
                    sectors += e.iter().map(|e| e * 4 / 32).collect::<BTreeSet<_>>().len();
                    ideal += (e.len() * 4).div_ceil(32);
                }
            }
        }
        (loads, sectors, ideal)
    }

    /// Coalescing of convolution weights: a warp's load touches at most one sector more per
    /// row segment than its floats fill (before, 3x3 kernels' lanes were 36 B apart: a sector
    /// per lane). `cargo test --lib warp_loads_of_conv -- --nocapture` prints the figures of
    /// `bench/results/rank4-coalescing.md`.
    #[test]
    fn warp_loads_of_conv_weights_touch_few_sectors() {
        for (shape, axes) in [
            ("64x64x3x3", None),
            ("16x8x3x3", None),
            ("512x512x3x3", None),
            ("128x64x5x5", None),
            ("64x3x7x7", None),
            ("64x3x7x7", Some((0, 2))),
            ("1024x512", None),
            ("4096", None),
        ] {
            let layout = layout(shape, axes);
            let t = Tiling::of(&layout);
            let (loads, sectors, ideal) = warp_sectors(&layout);
            let per = sectors as f64 / loads as f64;
            println!(
                "| {shape} | {axes:?} | {} | {} | {loads} | {per:.2} | {:.2} |",
                t.bx,
                t.row_len(),
                ideal as f64 / loads as f64
            );
            // At most one extra sector per row segment of the warp (misalignment).
            let segments_per_warp = (32 / t.bx).max(1);
            assert!(
                sectors <= ideal + loads * segments_per_warp,
                "{shape}: {sectors} sectors for {loads} loads (fewest {ideal})"
            );
        }
    }

    /// The partial layouts of the element means of a rank-4 tensor with inner axes: the row
    /// mean keeps X (one slot per Y tile), the column mean reduces X with an inner stride of 9
    /// (one slot per X' tile); with an inner run longer than a warp, one slot per index of X.
    #[test]
    fn partials_of_rank_4_means_follow_the_inner_axes() {
        let lopt = LearnedOptimizer::demo();
        for (shape, axes, x_slots) in [
            ("16x8x3x3", None, 3),
            ("64x3x7x7", Some((0, 2)), 2),
            ("9x8x6x6", None, 8),
        ] {
            let layout = layout(shape, axes);
            let t = Tiling::of(&layout);
            assert_eq!(t.x_slots(), x_slots, "{shape}");
            let ir = crate::compile_layout(&layout, &lopt).unwrap();
            let s = schedule(&ir);
            let KernelKind::Elem { means, .. } = &s.kernels[0].kind else {
                panic!("{shape}: pass 0 first");
            };
            let kinds: Vec<(PartialKind, usize)> = means
                .iter()
                .map(|m| (m.kind, m.partials_per_point))
                .collect();
            assert!(
                kinds.contains(&(PartialKind::KeepX, t.tiles_y)),
                "{shape}: {kinds:?}"
            );
            assert!(
                kinds.contains(&(PartialKind::KeepY, x_slots)),
                "{shape}: {kinds:?}"
            );
        }
    }
}
