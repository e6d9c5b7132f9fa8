//! IR → CUDA C text. The fixed scaffolding (kernel signatures, index decomposition,
//! deterministic reductions) lives in `templates/*.cu.j2`; this module fills its holes with
//! the nodes of the IR, one `float vN = …;` line per node, from a table of op → C expression.
//!
//! Shapes, strides and factored axes are compile-time constants; constants (including every
//! MLP weight) are exact f32 literals (9 significant digits round-trip an f32); element-domain
//! values live in registers.

use super::schedule::{
    elem_closure, ElemMean, Kernel, KernelKind, PartialKind, Schedule, Tiling, BLOCK_THREADS,
};
use crate::error::{Error, Result};
use crate::ir::{Binary, Buffer, Op, RuntimeScalar, StepIr, Unary, ValueId};
use crate::shape::{Domain, Layout};
use minijinja::{context, Environment};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

const PRELUDE: &str = include_str!("../../../templates/prelude.cu.j2");
const ELEM_KERNEL: &str = include_str!("../../../templates/elem_kernel.cu.j2");
const SMALL_KERNEL: &str = include_str!("../../../templates/small_kernel.cu.j2");
const HELPERS: &str = include_str!("../../../templates/helpers.cu.j2");
const MODEL_PRELUDE: &str = include_str!("../../../templates/model_prelude.cu.j2");
const MODEL_KERNEL: &str = include_str!("../../../templates/model_kernel.cu.j2");

/// An exact C literal for an f32: 9 significant digits round-trip every finite f32.
pub fn f32_literal(x: f32) -> String {
    if x.is_finite() {
        let text = format!("{x:.8e}f");
        if x.is_sign_negative() {
            format!("({text})")
        } else {
            text
        }
    } else {
        format!("__int_as_float(0x{:08x})", x.to_bits())
    }
}

/// A C double literal for a count (exact for counts below 2^53).
fn f64_literal(x: f64) -> String {
    format!("{x:.17e}")
}

/// One kernel parameter, in the order every kernel takes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    /// Name in the source and the manifest.
    pub name: String,
    /// C type.
    pub c_type: &'static str,
    /// `buffer`, `scratch` or `scalar`.
    pub kind: &'static str,
    /// Manifest dtype: `f32*`, `f64*` or `f32`.
    pub dtype: &'static str,
}

/// The parameters of every kernel of a layout: buffers in canonical order, the two scratch
/// arenas, then the runtime scalars.
pub fn params(layout: &Layout) -> Vec<Param> {
    let mut out: Vec<Param> = Buffer::for_layout(layout)
        .into_iter()
        .map(|b| Param {
            name: b.name().to_string(),
            c_type: if b == Buffer::Grad {
                "const float* __restrict__"
            } else {
                "float* __restrict__"
            },
            kind: "buffer",
            dtype: "f32*",
        })
        .collect();
    out.push(Param {
        name: "scratch".into(),
        c_type: "float* __restrict__",
        kind: "scratch",
        dtype: "f32*",
    });
    out.push(Param {
        name: "partials".into(),
        c_type: "double* __restrict__",
        kind: "scratch",
        dtype: "f64*",
    });
    for s in RuntimeScalar::ALL {
        out.push(Param {
            name: s.name().to_string(),
            c_type: "const float",
            kind: "scalar",
            dtype: "f32",
        });
    }
    out
}

/// Row-major strides of a domain's kept axes, by axis.
fn domain_strides(layout: &Layout, domain: Domain) -> BTreeMap<usize, usize> {
    let axes = layout.domain_axes(domain);
    let mut strides = BTreeMap::new();
    let mut stride = 1usize;
    for &a in axes.iter().rev() {
        strides.insert(a, stride);
        stride *= layout.dims()[a];
    }
    strides
}

/// Coordinate expressions of the point `var` of a row-major space over `axes`.
fn decompose(layout: &Layout, axes: &[usize], var: &str) -> BTreeMap<usize, String> {
    let mut out = BTreeMap::new();
    let mut stride = 1usize;
    for (i, &a) in axes.iter().enumerate().rev() {
        let d = layout.dims()[a];
        let div = if stride == 1 {
            var.to_string()
        } else {
            format!("({var} / {stride})")
        };
        // The outermost axis needs no modulo: the point is in range.
        let expr = if i == 0 {
            div
        } else {
            format!("({div} % {d})")
        };
        out.insert(a, expr);
        stride *= d;
    }
    out
}

/// The index in `domain` of the point with the given coordinates.
fn compose(layout: &Layout, domain: Domain, coords: &BTreeMap<usize, String>) -> String {
    let terms: Vec<String> = domain_strides(layout, domain)
        .into_iter()
        .filter(|&(a, _)| layout.dims()[a] > 1)
        .map(|(a, s)| {
            let c = &coords[&a];
            if s == 1 {
                c.clone()
            } else {
                format!("{c} * {s}")
            }
        })
        .collect();
    if terms.is_empty() {
        "0".to_string()
    } else {
        terms.join(" + ")
    }
}

/// How a value is referred to in C: a literal, a kernel argument, or a register `vN`/`vN[l]`.
fn operand(ir: &StepIr, v: ValueId, lane: u32) -> String {
    match &ir.node(v).op {
        Op::Const(c) => f32_literal(*c as f32),
        Op::Scalar(s) => s.name().to_string(),
        _ if ir.node(v).width == 1 => format!("{v}"),
        _ => format!("{v}[{lane}]"),
    }
}

/// The C expression of one lane of a lane-wise node (the op table).
fn lane_expr(ir: &StepIr, op: &Op, lane: u32) -> Option<String> {
    let o = |v: &ValueId| operand(ir, *v, lane);
    Some(match op {
        Op::Unary(u, a) => {
            let a = o(a);
            match u {
                Unary::Neg => format!("(-{a})"),
                Unary::Square => format!("({a} * {a})"),
                Unary::Rsqrt => format!("(1.0f / sqrtf({a}))"),
                Unary::Exp => format!("expf({a})"),
                Unary::Tanh => format!("tanhf({a})"),
                // NaN propagates, as in PyTorch and the interpreter.
                Unary::Relu => format!("({a} < 0.0f ? 0.0f : {a})"),
            }
        }
        Op::Binary(b, x, y) => {
            let (x, y) = (o(x), o(y));
            match b {
                Binary::Add => format!("({x} + {y})"),
                Binary::Sub => format!("({x} - {y})"),
                Binary::Mul => format!("({x} * {y})"),
                Binary::Div => format!("({x} / {y})"),
                // NaN in either operand propagates, as in the interpreter.
                Binary::Max => format!("(({x} != {x} || {x} >= {y}) ? {x} : {y})"),
            }
        }
        Op::Pack(xs) => operand(ir, xs[lane as usize], 0),
        Op::Lane { x, lane: l } => operand(ir, *x, *l),
        _ => return None,
    })
}

/// Declares register `vN` (or `vN[w]`) holding the value of a computed node (not a load, mean
/// or store).
fn compute_node(ir: &StepIr, v: ValueId, indent: &str, out: &mut String) -> Result<()> {
    let node = ir.node(v);
    let note = node
        .note
        .as_ref()
        .map(|n| format!("  // {n}"))
        .unwrap_or_default();
    if let Op::Dense { matrix, x } = &node.op {
        let m = ir.matrix(*matrix);
        let _ = writeln!(out, "{indent}float {v}[{}];{note}", m.rows);
        for r in 0..m.rows {
            let mut line = m
                .bias
                .as_ref()
                .map_or("0.0f".to_string(), |b| f32_literal(b[r]));
            for c in 0..m.cols {
                let _ = write!(
                    line,
                    " + {} * {}",
                    f32_literal(m.w(r, c)),
                    operand(ir, *x, c as u32)
                );
            }
            let _ = writeln!(out, "{indent}{v}[{r}] = {line};");
        }
        return Ok(());
    }
    if node.width == 1 {
        let e = lane_expr(ir, &node.op, 0)
            .ok_or_else(|| Error::Verify(format!("{v}: {:?} is not lane-wise", node.op)))?;
        let _ = writeln!(out, "{indent}const float {v} = {e};{note}");
    } else {
        let _ = writeln!(out, "{indent}float {v}[{}];{note}", node.width);
        for l in 0..node.width {
            let e = lane_expr(ir, &node.op, l)
                .ok_or_else(|| Error::Verify(format!("{v}: {:?} is not lane-wise", node.op)))?;
            let _ = writeln!(out, "{indent}{v}[{l}] = {e};");
        }
    }
    Ok(())
}

/// Declares register `vN` read from the scratch arena at index expression `idx`.
fn read_scratch(ir: &StepIr, s: &Schedule, v: ValueId, idx: &str, indent: &str, out: &mut String) {
    let node = ir.node(v);
    let off = s.scratch_offset[v.index()].unwrap_or(0);
    let w = node.width;
    if w == 1 {
        let _ = writeln!(out, "{indent}const float {v} = scratch[{off} + ({idx})];");
    } else {
        let _ = writeln!(out, "{indent}float {v}[{w}];");
        for l in 0..w {
            let _ = writeln!(
                out,
                "{indent}{v}[{l}] = scratch[{off} + ({idx}) * {w} + {l}];"
            );
        }
    }
}

fn buffer_index(layout: &Layout, buffer: Buffer, lane: u32, point: &str) -> String {
    let n = layout.domain_len(buffer.domain());
    if lane == 0 {
        point.to_string()
    } else {
        format!("{} + {point}", lane as usize * n)
    }
}

/// How a kernel of a step is emitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form<'a> {
    /// An `extern "C" __global__` entry point of a single-tensor program: its block index is
    /// `blockIdx.x` and it declares its own shared memory.
    Global,
    /// A `static __device__` function of a packed model program, named `{prefix}{kernel}`:
    /// the packed entry point passes the block index within the tensor (`mulo_blk`) and its
    /// shared memory (`mulo_smem`), so that any number of plans share one allocation.
    Device {
        /// Prepended to the kernel name (one prefix per plan).
        prefix: &'a str,
    },
}

fn template_env() -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.add_template("helpers", HELPERS)
        .map_err(template_error)?;
    env.add_template("prelude", PRELUDE)
        .map_err(template_error)?;
    env.add_template("elem", ELEM_KERNEL)
        .map_err(template_error)?;
    env.add_template("small", SMALL_KERNEL)
        .map_err(template_error)?;
    env.add_template("model_prelude", MODEL_PRELUDE)
        .map_err(template_error)?;
    env.add_template("model_kernel", MODEL_KERNEL)
        .map_err(template_error)?;
    Ok(env)
}

fn template_error(e: minijinja::Error) -> Error {
    Error::backend_from("cuda", "template", e)
}

/// Renders template `name` of the CUDA templates with `ctx`.
pub(super) fn render_template(name: &str, ctx: minijinja::Value) -> Result<String> {
    let env = template_env()?;
    env.get_template(name)
        .map_err(template_error)?
        .render(ctx)
        .map_err(template_error)
}

/// Renders the whole `.cu` source of a schedule.
pub fn render(ir: &StepIr, s: &Schedule) -> Result<String> {
    let layout = &ir.layout;
    let summaries: Vec<String> = s
        .kernels
        .iter()
        .map(|k| format!("{}: {}", k.name, summary(ir, k)))
        .collect();
    let mut src = render_template(
        "prelude",
        context! {
            shape => layout.shape().to_string(),
            version => env!("CARGO_PKG_VERSION"),
            fingerprint => ir.lopt_fingerprint.clone(),
            kernels => summaries,
            threads => BLOCK_THREADS,
        },
    )?;
    src.push_str(&render_kernels(ir, s, Form::Global)?);
    src.push('\n');
    Ok(src)
}

/// The C parameter list of every kernel of `layout` (without the packed-form prefix).
fn params_text(layout: &Layout) -> String {
    params(layout)
        .iter()
        .map(|p| format!("{} {}", p.c_type, p.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Renders every kernel of `s` in `form`, in launch order (no prelude).
pub fn render_kernels(ir: &StepIr, s: &Schedule, form: Form<'_>) -> Result<String> {
    let layout = &ir.layout;
    let env = template_env()?;
    let params_text = params_text(layout);
    let device = matches!(form, Form::Device { .. });
    let signature = |name: &str| {
        match form {
        Form::Global => format!(
            "extern \"C\" __global__ void __launch_bounds__({BLOCK_THREADS}) {name}({params_text})"
        ),
        Form::Device { prefix } => format!(
            "static __device__ __noinline__ void {prefix}{name}(const idx_t mulo_blk, double* __restrict__ mulo_smem, {params_text})"
        ),
    }
    };
    let block_index = if device { "mulo_blk" } else { "blockIdx.x" };
    let mut src = String::new();
    let mut pass = 0;
    for k in &s.kernels {
        let text = match &k.kind {
            KernelKind::Elem { means, stores } => {
                pass += 1;
                let holes = elem_holes(ir, s, means, *stores)?;
                let t = &s.tiling;
                env.get_template("elem")
                    .map_err(template_error)?
                    .render(context! {
                        name => k.name.clone(),
                        signature => signature(&k.name),
                        device => device,
                        block_index => block_index,
                        pass => pass,
                        summary => summary(ir, k),
                        numel => layout.numel(),
                        threads => BLOCK_THREADS,
                        reduces => !means.is_empty(),
                        blocks => t.blocks(),
                        rest_len => t.rest_len,
                        tiles_x => t.tiles_x,
                        tiles_y => t.tiles_y,
                        blocks_per_rest => t.blocks_per_rest(),
                        x_desc => t.x_axis.map_or("virtual".to_string(), |a| format!("axis {a}")),
                        y_axis => t.y_axis,
                        nx => t.nx,
                        ny => t.ny,
                        bx => t.bx,
                        by => t.by,
                        rows => t.rows_per_thread,
                        rest_coords => holes.rest_coords,
                        acc_decls => holes.acc_decls,
                        val_decls => holes.val_decls,
                        elem_index => holes.elem_index,
                        body => holes.body,
                        per_row => holes.per_row,
                        epilogue => holes.epilogue,
                    })
                    .map_err(template_error)?
            }
            KernelKind::Small { nodes, stores } => {
                let body = small_body(ir, s, nodes, stores)?;
                env.get_template("small")
                    .map_err(template_error)?
                    .render(context! {
                        name => k.name.clone(),
                        signature => signature(&k.name),
                        device => device,
                        summary => summary(ir, k),
                        threads => BLOCK_THREADS,
                        body => body,
                    })
                    .map_err(template_error)?
            }
        };
        src.push_str(&text);
    }
    Ok(src)
}

/// One line describing what a kernel does.
pub fn summary(ir: &StepIr, k: &Kernel) -> String {
    match &k.kind {
        KernelKind::Elem { means, stores } => {
            if *stores {
                let (nodes, reads) = elem_closure(
                    ir,
                    &ir.ids()
                        .filter(|&v| {
                            matches!(ir.node(v).op, Op::Store { .. })
                                && ir.node(v).domain == Domain::Elem
                        })
                        .collect::<Vec<_>>(),
                );
                format!(
                    "Computes {} element nodes in registers (reading {} small-domain values) and performs the element stores.",
                    nodes.len(),
                    reads.len()
                )
            } else {
                let targets: Vec<String> = means
                    .iter()
                    .map(|m| format!("{}→{}", m.node, ir.node(m.node).domain))
                    .collect();
                format!(
                    "Partial sums of {} element means: {}.",
                    means.len(),
                    targets.join(" ")
                )
            }
        }
        KernelKind::Small { nodes, stores } => format!(
            "Computes {} row/column/rest/step nodes into scratch{}.",
            nodes.len(),
            if stores.is_empty() {
                String::new()
            } else {
                format!(" and performs {} small-domain stores", stores.len())
            }
        ),
    }
}

struct ElemHoles {
    rest_coords: String,
    acc_decls: String,
    val_decls: String,
    elem_index: String,
    body: String,
    per_row: String,
    epilogue: String,
}

fn elem_coords(t: &Tiling) -> BTreeMap<usize, String> {
    let mut coords = BTreeMap::new();
    if let Some(x) = t.x_axis {
        coords.insert(x, "ix".to_string());
    }
    coords.insert(t.y_axis, "iy".to_string());
    for &a in &t.rest_axes {
        coords.insert(a, format!("c{a}"));
    }
    coords
}

fn elem_holes(ir: &StepIr, s: &Schedule, means: &[ElemMean], stores: bool) -> Result<ElemHoles> {
    let layout = &ir.layout;
    let t = &s.tiling;
    let coords = elem_coords(t);
    let mut rest_coords = String::new();
    for (a, e) in decompose(layout, &t.rest_axes, "rest") {
        let _ = writeln!(rest_coords, "    const idx_t c{a} = {e};");
    }
    let roots: Vec<ValueId> = if stores {
        ir.ids()
            .filter(|&v| {
                matches!(ir.node(v).op, Op::Store { .. }) && ir.node(v).domain == Domain::Elem
            })
            .collect()
    } else {
        means.iter().map(|m| m.operand).collect()
    };
    let (nodes, reads) = elem_closure(ir, &roots);
    let ind = "            ";
    let mut body = String::new();
    for &v in &reads {
        let idx = compose(layout, ir.node(v).domain, &coords);
        read_scratch(ir, s, v, &idx, ind, &mut body);
    }
    for &v in &nodes {
        let node = ir.node(v);
        match &node.op {
            Op::Load { buffer, lane } => {
                let _ = writeln!(
                    body,
                    "{ind}const float {v} = {}[{}];",
                    buffer.name(),
                    buffer_index(layout, *buffer, *lane, "e")
                );
            }
            Op::Store {
                buffer,
                lane,
                value,
            } => {
                let _ = writeln!(
                    body,
                    "{ind}{}[{}] = {};",
                    buffer.name(),
                    buffer_index(layout, *buffer, *lane, "e"),
                    operand(ir, *value, 0)
                );
            }
            Op::Mean(_) => {
                return Err(Error::Verify(format!(
                    "{v}: a mean on the element domain cannot be computed in registers"
                )))
            }
            _ => compute_node(ir, v, ind, &mut body)?,
        }
    }
    let mut acc_decls = String::new();
    let mut val_decls = String::new();
    let mut per_row = String::new();
    let mut epilogue = String::new();
    for (i, m) in means.iter().enumerate() {
        let w = ir.node(m.node).width;
        let target = ir.node(m.node).domain;
        let n = layout.domain_len(target);
        let off = m.partial_offset;
        let idx = compose(layout, target, &coords);
        for l in 0..w {
            let _ = writeln!(val_decls, "        float m{i}_{l} = 0.0f;");
            let _ = writeln!(body, "{ind}m{i}_{l} = {};", operand(ir, m.operand, l));
            match m.kind {
                PartialKind::KeepY => {
                    let _ = writeln!(
                        per_row,
                        "        {{ const double s = mulo_sum_x((double)m{i}_{l}, {bx}); if (tx == 0 && iy < {ny}) partials[{off} + (txt * {n} + {idx}) * {w} + {l}] = s; }}",
                        bx = t.bx,
                        ny = t.ny,
                    );
                }
                PartialKind::KeepX => {
                    let _ = writeln!(acc_decls, "    double a{i}_{l} = 0.0;");
                    let _ = writeln!(per_row, "        a{i}_{l} += (double)m{i}_{l};");
                    let _ = writeln!(
                        epilogue,
                        "    {{ const double s = mulo_sum_y(a{i}_{l}, mulo_smem, {bx}); if (ty == 0 && ix < {nx}) partials[{off} + (tyt * {n} + {idx}) * {w} + {l}] = s; }}",
                        bx = t.bx,
                        nx = t.nx,
                    );
                }
                PartialKind::Blocks => {
                    let _ = writeln!(acc_decls, "    double a{i}_{l} = 0.0;");
                    let _ = writeln!(per_row, "        a{i}_{l} += (double)m{i}_{l};");
                    let _ = writeln!(
                        epilogue,
                        "    {{ const double s = mulo_block_sum(a{i}_{l}, mulo_smem); if (tid == 0) partials[{off} + blk * {w} + {l}] = s; }}"
                    );
                }
            }
        }
    }
    Ok(ElemHoles {
        rest_coords,
        acc_decls,
        val_decls,
        elem_index: compose(layout, Domain::Elem, &coords),
        body,
        per_row,
        epilogue,
    })
}

/// Opens the region in which the threads of a small kernel's block visit the `n` points of a
/// domain as `p`: one point per thread without a loop when `n` fits in the block (NVRTC's
/// compile time grows much faster with the number of loops than with straight-line code),
/// else a block-strided loop. Closed by `}`.
fn open_points(n: usize) -> String {
    let t = BLOCK_THREADS;
    if n <= t {
        format!("    if (tid < {n}) {{ const idx_t p = tid;\n")
    } else {
        format!("    for (idx_t p = tid; p < {n}; p += {t}) {{\n")
    }
}

/// Whether a small node is computed point by point from values of its own point (grouped with
/// its neighbours of the same domain into one region without barriers).
fn is_pointwise(ir: &StepIr, v: ValueId) -> bool {
    !matches!(
        ir.node(v).op,
        Op::Mean(_) | Op::Load { .. } | Op::Store { .. } | Op::Const(_) | Op::Scalar(_)
    )
}

fn small_body(ir: &StepIr, s: &Schedule, nodes: &[ValueId], stores: &[ValueId]) -> Result<String> {
    let layout = &ir.layout;
    let t = BLOCK_THREADS;
    let mut out = String::new();
    // Consecutive pointwise nodes of one domain share a region: each thread computes them
    // for its points in registers (and into scratch for later kernels and other domains),
    // with one barrier after the group instead of one per node.
    let mut i = 0;
    while i < nodes.len() {
        let v = nodes[i];
        if is_pointwise(ir, v) {
            let d = ir.node(v).domain;
            let mut j = i;
            while j < nodes.len() && is_pointwise(ir, nodes[j]) && ir.node(nodes[j]).domain == d {
                j += 1;
            }
            small_group(ir, s, &nodes[i..j], &mut out)?;
            let _ = writeln!(out, "    __syncthreads();");
            i = j;
            continue;
        }
        i += 1;
        let node = ir.node(v);
        let d = node.domain;
        let n = layout.domain_len(d);
        let w = node.width as usize;
        let off = s.scratch_offset[v.index()]
            .ok_or_else(|| Error::Verify(format!("{v}: small node without a scratch slot")))?;
        let note = node.note.as_deref().unwrap_or("");
        let _ = writeln!(out, "    // {v} on {d} x{w}: {note}");
        match &node.op {
            Op::Mean(a) if ir.node(*a).domain == Domain::Elem => {
                let m = s
                    .kernels
                    .iter()
                    .filter_map(|k| match &k.kind {
                        KernelKind::Elem { means, .. } => means.iter().find(|m| m.node == v),
                        _ => None,
                    })
                    .next()
                    .ok_or_else(|| Error::Verify(format!("{v}: element mean without partials")))?;
                let count = f64_literal((layout.numel() / n) as f64);
                let (po, k) = (m.partial_offset, m.partials_per_point);
                match m.kind {
                    PartialKind::KeepX | PartialKind::KeepY => {
                        out.push_str(&open_points(n));
                        for l in 0..w {
                            let _ = writeln!(out, "        {{ double s = 0.0; for (idx_t k = 0; k < {k}; ++k) s += partials[{po} + (k * {n} + p) * {w} + {l}]; scratch[{off} + p * {w} + {l}] = (float)(s / {count}); }}");
                        }
                        let _ = writeln!(out, "    }}");
                    }
                    PartialKind::Blocks if n == 1 => {
                        for l in 0..w {
                            let _ = writeln!(out, "    {{ double s = 0.0; for (idx_t k = tid; k < {k}; k += {t}) s += partials[{po} + k * {w} + {l}]; s = mulo_block_sum(s, mulo_smem); if (tid == 0) scratch[{off} + {l}] = (float)(s / {count}); }}");
                        }
                    }
                    PartialKind::Blocks => {
                        out.push_str(&open_points(n));
                        for l in 0..w {
                            let _ = writeln!(out, "        {{ double s = 0.0; for (idx_t k = 0; k < {k}; ++k) s += partials[{po} + (p * {k} + k) * {w} + {l}]; scratch[{off} + p * {w} + {l}] = (float)(s / {count}); }}");
                        }
                        let _ = writeln!(out, "    }}");
                    }
                }
            }
            Op::Mean(a) => {
                let from = ir.node(*a).domain;
                let from_axes = layout.domain_axes(from);
                let to_axes = layout.domain_axes(d);
                let reduced: Vec<usize> = from_axes
                    .iter()
                    .copied()
                    .filter(|x| !to_axes.contains(x))
                    .collect();
                let count = layout.domain_len(from) / n;
                let mut coords = decompose(layout, &to_axes, "p");
                coords.extend(decompose(layout, &reduced, "k"));
                let aidx = compose(layout, from, &coords);
                let aoff = s.scratch_offset[a.index()]
                    .ok_or_else(|| Error::Verify(format!("{a}: mean operand not in scratch")))?;
                let cnt = f64_literal(count as f64);
                if n >= 64 {
                    out.push_str(&open_points(n));
                    for l in 0..w {
                        let _ = writeln!(out, "        {{ double s = 0.0; for (idx_t k = 0; k < {count}; ++k) s += (double)scratch[{aoff} + ({aidx}) * {w} + {l}]; scratch[{off} + p * {w} + {l}] = (float)(s / {cnt}); }}");
                    }
                    let _ = writeln!(out, "    }}");
                } else {
                    let _ = writeln!(out, "    for (idx_t p = 0; p < {n}; ++p) {{");
                    for l in 0..w {
                        let _ = writeln!(out, "        {{ double s = 0.0; for (idx_t k = tid; k < {count}; k += {t}) s += (double)scratch[{aoff} + ({aidx}) * {w} + {l}]; s = mulo_block_sum(s, mulo_smem); if (tid == 0) scratch[{off} + p * {w} + {l}] = (float)(s / {cnt}); }}");
                    }
                    let _ = writeln!(out, "    }}");
                }
            }
            Op::Load { buffer, lane } => {
                out.push_str(&open_points(n));
                let _ = writeln!(
                    out,
                    "        scratch[{off} + p] = {}[{}];",
                    buffer.name(),
                    buffer_index(layout, *buffer, *lane, "p")
                );
                let _ = writeln!(out, "    }}");
            }
            _ => return Err(Error::Verify(format!("{v}: not computed into scratch"))),
        }
        let _ = writeln!(out, "    __syncthreads();");
    }
    for &v in stores {
        let Op::Store {
            buffer,
            lane,
            value,
        } = &ir.node(v).op
        else {
            continue;
        };
        let d = ir.node(v).domain;
        let n = layout.domain_len(d);
        let coords = decompose(layout, &layout.domain_axes(d), "p");
        let _ = writeln!(out, "    // store {}[{lane}] = {value}", buffer.name());
        out.push_str(&open_points(n));
        if s.scratch_offset[value.index()].is_some() {
            let idx = compose(layout, ir.node(*value).domain, &coords);
            read_scratch(ir, s, *value, &idx, "        ", &mut out);
        }
        let _ = writeln!(
            out,
            "        {}[{}] = {};",
            buffer.name(),
            buffer_index(layout, *buffer, *lane, "p"),
            operand(ir, *value, 0)
        );
        let _ = writeln!(out, "    }}");
    }
    Ok(out)
}

/// One region computing the pointwise small nodes `group` (all on one domain) for every
/// point: operands of the group come from registers, the others from scratch; every node is
/// also written to scratch.
fn small_group(ir: &StepIr, s: &Schedule, group: &[ValueId], out: &mut String) -> Result<()> {
    let layout = &ir.layout;
    let d = ir.node(group[0]).domain;
    let n = layout.domain_len(d);
    for &v in group {
        let node = ir.node(v);
        let _ = writeln!(
            out,
            "    // {v} on {d} x{}: {}",
            node.width,
            node.note.as_deref().unwrap_or("")
        );
    }
    out.push_str(&open_points(n));
    let coords = decompose(layout, &layout.domain_axes(d), "p");
    let mut in_registers: BTreeSet<ValueId> = BTreeSet::new();
    for &v in group {
        let node = ir.node(v);
        let w = node.width as usize;
        let off = s.scratch_offset[v.index()]
            .ok_or_else(|| Error::Verify(format!("{v}: small node without a scratch slot")))?;
        for o in node.op.operands() {
            if s.scratch_offset[o.index()].is_some() && in_registers.insert(o) {
                let idx = compose(layout, ir.node(o).domain, &coords);
                read_scratch(ir, s, o, &idx, "        ", out);
            }
        }
        compute_node(ir, v, "        ", out)?;
        in_registers.insert(v);
        for l in 0..w {
            let _ = writeln!(
                out,
                "        scratch[{off} + p * {w} + {l}] = {};",
                operand(ir, v, l as u32)
            );
        }
    }
    let _ = writeln!(out, "    }}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_round_trip() {
        for x in [
            0.1f32,
            -0.542_027_3,
            1e-30,
            f32::MIN_POSITIVE,
            1.4e-45,
            3.4028235e38,
            0.0,
        ] {
            let text = f32_literal(x);
            let digits = text
                .trim_matches(|c| c == '(' || c == ')')
                .trim_end_matches('f');
            assert_eq!(
                digits.parse::<f32>().unwrap().to_bits(),
                x.to_bits(),
                "{text}"
            );
        }
        assert_eq!(f32_literal(f32::INFINITY), "__int_as_float(0x7f800000)");
    }

    #[test]
    fn index_composition() {
        let layout = Layout::new(crate::shape::Shape::parse("2x3x4").unwrap());
        let coords = decompose(&layout, &[0, 1, 2], "p");
        assert_eq!(coords[&0], "(p / 12)");
        assert_eq!(coords[&1], "((p / 4) % 3)");
        assert_eq!(coords[&2], "(p % 4)");
        assert_eq!(
            compose(&layout, Domain::Elem, &coords),
            "(p / 12) * 12 + ((p / 4) % 3) * 4 + (p % 4)"
        );
    }
}
