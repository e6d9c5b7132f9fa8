//! The native CPU backend: the IR compiled once into per-level chunk programs, executed over
//! the elements in chunks of [`CHUNK`] on a few threads.
//!
//! Generic over the IR, like the CUDA schedule it borrows its levels from
//! ([`crate::backend::cuda::schedule`]): the **level** of a node is the number of element-domain
//! means on its path. A step runs, for each level `k`:
//!
//! 1. the *small phase*: the row/column/rest/step nodes of level `k`, materialized over their
//!    (small) domains with scalar code; element means of level `k` are finished here from the
//!    partial sums of pass `k − 1`;
//! 2. the *elem pass*: a linear program of lane-parallel instructions over every chunk of
//!    elements, computing the operands of the element means of level `k + 1` (accumulated into
//!    f64 partial sums), or, in the last pass, the element stores. Element values are never
//!    materialized over the tensor: each pass recomputes what it needs from the loads.
//!
//! Instructions are fused where a value's only use is the next instruction (all with the
//! roundings of the separate instructions): a dense layer with its add and relu, a square
//! with the mean it feeds, two scalar products with their sum, two products by small
//! operands, a pack of scalar products. Each chunk prefetches the element buffers its pass
//! reads a few chunks ahead.
//!
//! Small-domain stores are written after the last pass. Element stores are written at the end
//! of each chunk of the last pass, after every load of that chunk.
//!
//! **Determinism.** The chunks are grouped into a fixed number of contiguous *slices* that
//! depends only on the shape; each slice accumulates its partial sums in chunk order, and the
//! slices are combined in order. Threads take whole slices, so the result is bitwise the same
//! for any thread count.
//!
//! **Threads.** A pass runs on [`default_threads`] threads (the available cores, or
//! `MULO_CPU_THREADS`), or as many as [`CpuStepper::with_threads`] says.
//!
//! **Instruction sets** ([`Isa`], checked at run time, forced with `MULO_CPU_ISA`): the chunk
//! loop is compiled three times: AVX-512F (the dense layers in 8-row × 32-lane register blocks
//! of `std::arch` intrinsics), AVX2 + FMA (4-row × 16-lane blocks, auto-vectorized), and
//! portable code (no FMA). The two FMA paths give bitwise the same results.
//!
//! **Modules.** [`isa`](Isa) detection; `program`: building a [`CpuProgram`] from the IR;
//! `exec`: the chunk executor; `stepper`: [`CpuStepper`] (small phases through the
//! interpreter's per-node evaluator, passes on the threads, stores); `kernels`: the
//! lane-parallel and dense kernels; `staged`: [`CpuStaged`], the staged step of one shard of a
//! tensor split by rows (the [`StagePlan`](crate::plan::StagePlan) rendered with the same chunk
//! programs, for [`crate::shard`]); [`mod@bench`]: kernel microbenchmarks.

pub mod bench;
mod exec;
mod isa;
mod kernels;
mod program;
mod staged;
mod stepper;

pub use isa::Isa;
pub use program::CpuProgram;
pub use staged::{CpuStaged, CpuStagedStep};
pub use stepper::{default_threads, CpuFactory, CpuStepper};

/// Elements per chunk: the lane count of every chunk value.
pub const CHUNK: usize = 256;

/// Most slices (groups of chunks with their own partial sums) a pass is split into.
const SLICES: usize = 16;
