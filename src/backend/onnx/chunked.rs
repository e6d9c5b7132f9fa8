//! A faster CPU runtime: the step split into a statistics graph and a per-chunk graph, both
//! rendered from the IR, the chunks run on several threads.
//!
//! The whole-step graph materializes every element-domain intermediate at full size (a
//! `[N, 32]` hidden activation is 64 MB at 1024x512), which tract allocates, page-faults and
//! streams through memory on every step. Here:
//!
//! - the **statistics graph** computes every value that is not on the element domain (the
//!   row/column accumulators and their stores, the normalization means, the time features, the
//!   per-row/column/step partial products of the first layer) and the element-domain values
//!   those need, over the whole tensor;
//! - the **chunk graph** computes the element-domain rest (features, MLP, update, element
//!   stores) for a block of rows of axis 0, taking the statistics graph's values as inputs.
//!
//! Axis 0 is the outermost, so a block of its rows is a contiguous range of every buffer, and of
//! every statistic that varies along it. The chunks are independent and run on
//! [`ChunkedOnnxStepper::threads`] threads. The partition is by domain only: the renderer walks
//! IR nodes, as for the whole graph.

use super::render::{render_graph, GraphSpec};
use super::runtime::f32_slice;
use super::runtime::optimized_model;
use crate::backend::{check_step_args, Hyper, TensorStepper};
use crate::error::{Error, Result};
use crate::ir::{Buffer, Op, StepIr};
use crate::shape::{Domain, Layout};
use crate::state::TensorState;
use protobuf::Message;
use std::sync::Arc;
use tract_onnx::prelude::*;

/// Elements per chunk the runtime aims at by default.
pub const DEFAULT_CHUNK_ELEMENTS: usize = 16384;

fn backend_err(context: &str, e: impl Into<crate::error::BoxError>) -> Error {
    Error::backend_from("onnx", context, e)
}

fn plan_for(layout: &Layout, model: &onnx_protobuf::ModelProto) -> Result<Arc<TypedRunnableModel>> {
    let bytes = model
        .write_to_bytes()
        .map_err(|e| backend_err("serializing a partial graph", e))?;
    optimized_model(layout, &bytes)?
        .into_runnable()
        .map_err(|e| backend_err("planning a partial graph", e))
}

/// What one chunk gives back: its first row, its row count, the chunk graph's outputs.
type ChunkResult = (usize, usize, TVec<TValue>);

/// One chunk graph, for blocks of `rows` rows of axis 0.
struct ChunkPlan {
    rows: usize,
    plan: Arc<TypedRunnableModel>,
}

/// A [`TensorStepper`] running the step as a statistics graph and per-chunk graphs in tract.
pub struct ChunkedOnnxStepper {
    layout: Layout,
    stats: Arc<TypedRunnableModel>,
    chunks: Vec<ChunkPlan>,
    rows_per_chunk: usize,
    /// IR values passed from the statistics graph to the chunk graph, with their full shapes.
    boundary: Vec<(usize, Vec<usize>)>,
    /// Buffers the statistics graph writes (not on the element domain).
    stats_buffers: Vec<Buffer>,
    /// Element-domain buffers the chunk graph reads, and those it writes.
    chunk_inputs: Vec<Buffer>,
    chunk_outputs: Vec<Buffer>,
    state: TensorState,
    threads: usize,
}

impl std::fmt::Debug for ChunkedOnnxStepper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkedOnnxStepper")
            .field("shape", &self.layout.shape().to_string())
            .field("rows_per_chunk", &self.rows_per_chunk)
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

/// Keepdims shape of a value on `domain` with `width` lanes, for `dims`.
fn keepdims(layout: &Layout, dims: &[usize], domain: Domain, width: u32) -> Vec<usize> {
    let kept = layout.domain_axes(domain);
    let mut shape: Vec<usize> = (0..dims.len())
        .map(|a| if kept.contains(&a) { dims[a] } else { 1 })
        .collect();
    if width > 1 {
        shape.push(width as usize);
    }
    shape
}

impl ChunkedOnnxStepper {
    /// Whether the chunked runtime applies to `layout`: rank ≥ 1 and at least two rows on axis 0.
    pub fn supports(layout: &Layout) -> bool {
        !layout.shape().dims().is_empty() && layout.dims()[0] >= 2
    }

    /// Builds the statistics and chunk plans; zero state, step counter `start_step`.
    /// `chunk_elements` is the target size of a chunk, `threads` the number of worker threads.
    pub fn new(
        ir: &StepIr,
        start_step: u64,
        chunk_elements: usize,
        threads: usize,
    ) -> Result<Self> {
        let layout = &ir.layout;
        if !Self::supports(layout) {
            return Err(Error::argument(
                "shape",
                format!(
                    "{} has fewer than 2 rows on axis 0: use OnnxStepper",
                    layout.shape()
                ),
            ));
        }
        let split = split_specs(ir, layout.dims()[0]);
        let stats_spec = split.stats;
        let boundary = split.boundary;
        let stats_buffers = stats_spec.output_buffers.clone();
        let chunk_inputs = split.chunk.input_buffers.clone();
        let chunk_outputs = split.chunk.output_buffers.clone();
        let stats_plan = plan_for(layout, &render_graph(ir, &stats_spec)?)?;

        let rows_total = layout.dims()[0];
        let row_len = layout.numel() / rows_total;
        let rows_per_chunk = (chunk_elements / row_len).clamp(1, rows_total);
        let mut chunk_rows = vec![rows_per_chunk];
        if !rows_total.is_multiple_of(rows_per_chunk) {
            chunk_rows.push(rows_total % rows_per_chunk);
        }
        let mut chunks = Vec::new();
        for rows in chunk_rows {
            let spec = split_specs(ir, rows).chunk;
            let model = render_graph(ir, &spec)?;
            let bytes = model
                .write_to_bytes()
                .map_err(|e| backend_err("serializing the chunk graph", e))?;
            chunks.push(ChunkPlan {
                rows,
                plan: chunk_plan(&bytes)?,
            });
        }
        Ok(ChunkedOnnxStepper {
            layout: layout.clone(),
            stats: stats_plan,
            chunks,
            rows_per_chunk,
            boundary,
            stats_buffers,
            chunk_inputs,
            chunk_outputs,
            state: TensorState::zeros(layout, start_step),
            threads: threads.max(1),
        })
    }

    /// Number of worker threads the chunks run on.
    pub fn threads(&self) -> usize {
        self.threads
    }

    fn run_chunk(
        &self,
        row0: usize,
        plan: &ChunkPlan,
        param: &[f32],
        grad: &[f32],
        stats: &[TValue],
    ) -> Result<TVec<TValue>> {
        let n = self.layout.numel();
        let row_len = n / self.layout.dims()[0];
        let (start, end) = (row0 * row_len, (row0 + plan.rows) * row_len);
        let mut lane_shape = self.layout.dims().to_vec();
        lane_shape[0] = plan.rows;
        let mut inputs: TVec<TValue> = TVec::new();
        for &buffer in &self.chunk_inputs {
            let data: &[f32] = match buffer {
                Buffer::Param => param,
                Buffer::Grad => grad,
                b => self.state.get(b),
            };
            let lanes = buffer.lanes();
            let mut shape = lane_shape.clone();
            let tensor = if lanes == 1 {
                Tensor::from_shape(&shape, &data[start..end])
            } else {
                shape.insert(0, lanes);
                let mut v = Vec::with_capacity(lanes * (end - start));
                for l in 0..lanes {
                    v.extend_from_slice(&data[l * n + start..l * n + end]);
                }
                Tensor::from_shape(&shape, &v)
            }
            .map_err(|e| backend_err(buffer.name(), e))?;
            inputs.push(tensor.into());
        }
        for ((_, full), value) in self.boundary.iter().zip(stats) {
            if full[0] == 1 {
                inputs.push(value.clone());
            } else {
                let stride: usize = full[1..].iter().product();
                let all = value
                    .try_as_plain_ram()
                    .and_then(|v| v.as_slice::<f32>())
                    .map_err(|e| backend_err("a statistic", e))?;
                let mut shape = full.clone();
                shape[0] = plan.rows;
                let t =
                    Tensor::from_shape(&shape, &all[row0 * stride..(row0 + plan.rows) * stride])
                        .map_err(|e| backend_err("a statistic", e))?;
                inputs.push(t.into());
            }
        }
        plan.plan
            .run(inputs)
            .map_err(|e| backend_err("running a chunk", e))
    }
}

/// The two graphs of the chunked runtime and what passes between them.
#[derive(Clone, Debug)]
pub struct SplitSpecs {
    /// The statistics graph: inputs as the whole graph; outputs the non-element buffers, then
    /// the boundary values.
    pub stats: GraphSpec,
    /// The chunk graph for `rows` rows of axis 0: inputs the element-domain buffers, then the
    /// boundary values; outputs the element-domain buffers but the gradient.
    pub chunk: GraphSpec,
    /// The boundary values (IR node index, full keepdims shape).
    pub boundary: Vec<(usize, Vec<usize>)>,
}

/// Partitions `ir` by domain into the statistics graph and the chunk graph for `rows` rows.
pub fn split_specs(ir: &StepIr, rows: usize) -> SplitSpecs {
    let layout = &ir.layout;
    let n = ir.nodes.len();
    // Statistics: everything off the element domain and what it depends on.
    let mut stats = vec![false; n];
    for i in (0..n).rev() {
        if ir.nodes[i].domain != Domain::Elem {
            stats[i] = true;
        }
        if stats[i] {
            for o in ir.nodes[i].op.operands() {
                stats[o.index()] = true;
            }
        }
    }
    // Chunk: the element-domain nodes the element stores depend on; what they read off the
    // element domain is the boundary.
    let mut chunk = vec![false; n];
    let mut is_boundary = vec![false; n];
    for i in (0..n).rev() {
        let node = &ir.nodes[i];
        if node.domain == Domain::Elem && matches!(node.op, Op::Store { .. }) {
            chunk[i] = true;
        }
        if chunk[i] {
            for o in node.op.operands() {
                if ir.node(o).domain == Domain::Elem {
                    chunk[o.index()] = true;
                } else {
                    is_boundary[o.index()] = true;
                }
            }
        }
    }
    let boundary_ids: Vec<usize> = (0..n).filter(|&i| is_boundary[i]).collect();
    let boundary = boundary_ids
        .iter()
        .map(|&i| {
            let node = &ir.nodes[i];
            (i, keepdims(layout, layout.dims(), node.domain, node.width))
        })
        .collect();
    let buffers = Buffer::for_layout(layout);
    let stats_buffers: Vec<Buffer> = buffers
        .iter()
        .copied()
        .filter(|b| b.domain() != Domain::Elem)
        .collect();
    let chunk_inputs: Vec<Buffer> = buffers
        .iter()
        .copied()
        .filter(|b| b.domain() == Domain::Elem)
        .collect();
    let chunk_outputs: Vec<Buffer> = chunk_inputs
        .iter()
        .copied()
        .filter(|b| *b != Buffer::Grad)
        .collect();

    let mut stats_spec = GraphSpec::whole(ir);
    stats_spec.name = format!("mulo_stats_{}", layout.shape());
    stats_spec.render = stats;
    stats_spec.output_buffers = stats_buffers.clone();
    stats_spec.value_outputs = boundary_ids.clone();
    stats_spec.step_out = false;
    let mut dims = layout.dims().to_vec();
    dims[0] = rows;
    let chunk = GraphSpec {
        name: format!("mulo_chunk_{}_rows_{rows}", layout.shape()),
        dims: dims.clone(),
        elem_io: dims,
        render: chunk,
        external: boundary_ids,
        input_buffers: chunk_inputs,
        scalar_inputs: false,
        output_buffers: chunk_outputs,
        value_outputs: Vec::new(),
        step_out: false,
    };
    SplitSpecs {
        stats: stats_spec,
        chunk,
        boundary,
    }
}

fn chunk_plan(bytes: &[u8]) -> Result<Arc<TypedRunnableModel>> {
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .map_err(|e| backend_err("reading the chunk graph", e))?;
    super::runtime::optimize_inference(model)?
        .into_runnable()
        .map_err(|e| backend_err("planning the chunk graph", e))
}

impl TensorStepper for ChunkedOnnxStepper {
    fn target(&self) -> &'static str {
        "onnx"
    }

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn step(&mut self, param: &mut [f32], grad: &[f32], hyper: Hyper) -> Result<()> {
        check_step_args(&self.layout, param.len(), grad.len(), &hyper)?;
        let step = i64::try_from(self.state.step)
            .map_err(|_| Error::argument("step", format!("{} is over i64", self.state.step)))?;
        let shape = self.layout.shape().dims().to_vec();
        let mut inputs: TVec<TValue> = TVec::new();
        for buffer in Buffer::for_layout(&self.layout) {
            let data: &[f32] = match buffer {
                Buffer::Param => param,
                Buffer::Grad => grad,
                b => self.state.get(b),
            };
            let mut s = if buffer.domain() == Domain::Elem {
                shape.clone()
            } else {
                self.layout.domain_shape(buffer.domain())
            };
            if buffer.lanes() > 1 {
                s.insert(0, buffer.lanes());
            }
            let t = Tensor::from_shape(&s, data).map_err(|e| backend_err(buffer.name(), e))?;
            inputs.push(t.into());
        }
        inputs.push(tensor0(step).into());
        inputs.push(tensor0(hyper.lr).into());
        inputs.push(tensor0(hyper.weight_decay).into());
        let stats_out = self
            .stats
            .run(inputs)
            .map_err(|e| backend_err("running the statistics graph", e))?;
        let (stats_buffers, stats_values) = stats_out.split_at(self.stats_buffers.len());

        // Chunks, round-robin over the threads.
        let rows_total = self.layout.dims()[0];
        let mut jobs = Vec::new();
        let mut row0 = 0;
        while row0 < rows_total {
            let plan = if row0 + self.rows_per_chunk <= rows_total {
                0
            } else {
                1
            };
            jobs.push((row0, plan));
            row0 += self.chunks[plan].rows;
        }
        let this = &*self;
        let param_in: &[f32] = param;
        let results: Vec<Result<Vec<ChunkResult>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..this.threads)
                .map(|t| {
                    let jobs = &jobs;
                    s.spawn(move || {
                        jobs.iter()
                            .skip(t)
                            .step_by(this.threads)
                            .map(|&(row0, plan)| {
                                let p = &this.chunks[plan];
                                this.run_chunk(row0, p, param_in, grad, stats_values)
                                    .map(|out| (row0, p.rows, out))
                            })
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(backend_err("a chunk thread", "panicked")))
                })
                .collect()
        });
        let n = self.layout.numel();
        let row_len = n / rows_total;
        let mut new_param = vec![0f32; n];
        let mut new_state = self.state.clone();
        new_state.step += 1;
        for result in results {
            for (row0, rows, outs) in result? {
                let (start, len) = (row0 * row_len, rows * row_len);
                for (buffer, out) in self.chunk_outputs.iter().zip(&outs) {
                    let src = f32_slice(out)?;
                    let dst: &mut [f32] = match buffer {
                        Buffer::Param => &mut new_param,
                        b => new_state.get_mut(*b),
                    };
                    for l in 0..buffer.lanes() {
                        dst[l * n + start..l * n + start + len]
                            .copy_from_slice(&src[l * len..(l + 1) * len]);
                    }
                }
            }
        }
        for (buffer, out) in self.stats_buffers.iter().zip(stats_buffers) {
            new_state.set(*buffer, f32_slice(out)?.to_vec())?;
        }
        param.copy_from_slice(&new_param);
        self.state = new_state;
        Ok(())
    }

    fn state(&self) -> Result<TensorState> {
        Ok(self.state.clone())
    }

    fn set_state(&mut self, state: TensorState) -> Result<()> {
        crate::backend::check_state_layout(&self.layout, &state)?;
        self.state = state;
        Ok(())
    }
}
