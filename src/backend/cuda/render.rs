//! IR → CUDA C text. The fixed scaffolding (kernel signatures, index decomposition,
//! deterministic reductions) lives in `templates/*.cu.j2`; this module fills its holes with
//! the nodes of the IR, one `float vN = …;` line per node, from a table of op → C expression.
//!
//! Shapes, strides and factored axes are compile-time constants; constants (including every
//! MLP weight) are exact f32 literals (9 significant digits round-trip an f32); element-domain
//! values live in registers.

use super::roll::roll;
use super::schedule::{
    elem_closure, spread_run, ElemMean, Kernel, KernelKind, PartialKind, Schedule, Tiling,
    BLOCK_THREADS,
};
use crate::error::{Error, Result};
use crate::ir::{Binary, Buffer, Matrix, Op, RuntimeScalar, StepIr, Unary, ValueId};
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
    let terms = stride_terms(layout, domain, coords, |_| true);
    if terms.is_empty() {
        "0".to_string()
    } else {
        terms.join(" + ")
    }
}

/// The terms `coordinate * stride` of the index in `domain`, for the axes of more than one
/// point that `keep` accepts, in axis order.
fn stride_terms(
    layout: &Layout,
    domain: Domain,
    coords: &BTreeMap<usize, String>,
    keep: impl Fn(usize) -> bool,
) -> Vec<String> {
    domain_strides(layout, domain)
        .into_iter()
        .filter(|&(a, _)| keep(a) && layout.dims()[a] > 1)
        .map(|(a, s)| {
            let c = &coords[&a];
            if s == 1 {
                c.clone()
            } else {
                format!("{c} * {s}")
            }
        })
        .collect()
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
    match op {
        Op::Pack(xs) => Some(operand(ir, xs[lane as usize], 0)),
        Op::Lane { x, lane: l } => Some(operand(ir, *x, *l)),
        _ => lanewise_expr(op, |v| operand(ir, *v, lane)),
    }
}

/// The C expression of a unary or binary node, its operands given by `o` (the op table).
fn lanewise_expr(op: &Op, o: impl Fn(&ValueId) -> String) -> Option<String> {
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
                // NaN fails every comparison, hence the `x != x` test first; the bound is
                // written out because NVRTC compiles without <cfloat>.
                Unary::NanToNum => format!(
                    "(({a}) != ({a}) ? 0.0f : fminf(fmaxf({a}, -3.40282347e+38f), 3.40282347e+38f))"
                ),
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
            let mut decl = String::new();
            let line = dense_row_at(m, r, &format!("{v}_w{r}"), &mut decl, |c| {
                operand(ir, *x, c as u32)
            });
            let _ = writeln!(out, "{indent}{decl}{v}[{r}] = {line};");
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

/// The `__constant__` arrays of a matrix: its weights and its bias, named by a digest of their
/// contents (so that the plans of a packed program share one copy of equal matrices).
pub fn matrix_names(m: &Matrix) -> (String, String) {
    let dims = [m.rows as u64, m.cols as u64];
    let dims: Vec<u8> = dims.iter().flat_map(|d| d.to_le_bytes()).collect();
    let weight = crate::digest::f32_bytes(&m.weight);
    let bias = crate::digest::f32_bytes(m.bias.as_deref().unwrap_or(&[]));
    let key = crate::digest::sha256_hex([dims.as_slice(), &weight, &bias]);
    (
        format!("mulo_w_{}", &key[..12]),
        format!("mulo_b_{}", &key[..12]),
    )
}

/// The `__constant__` array of a matrix's weights transposed (`[cols, rows]`, column-major):
/// what a loop over the columns reads, each column contiguous.
pub fn transposed_name(m: &Matrix) -> String {
    matrix_names(m).0.replace("mulo_w_", "mulo_wt_")
}

/// One output of a dense layer as a C expression: `bias + w0 * x0 + w1 * x1 + …` (the
/// interpreter's order: the bias, then the columns in order), `bias` being `None` for a
/// matrix without one and `w(c)` the weight of column `c`.
fn dense_row(
    bias: Option<String>,
    cols: usize,
    w: impl Fn(usize) -> String,
    x: impl Fn(usize) -> String,
) -> String {
    let mut line = bias.unwrap_or_else(|| "0.0f".to_string());
    for c in 0..cols {
        let _ = write!(line, " + {} * {}", w(c), x(c));
    }
    line
}

/// The alignment, in bytes, of every `__constant__` array of a program (`__align__`): a
/// run of 4 floats starting at a multiple of 4 is one aligned `float4`.
pub const CONSTANT_ALIGN: usize = 16;

/// The `n` consecutive floats of `__constant__` memory at `base` (an address of an array
/// element whose index is a multiple of 4) as C expressions: read as `float4` quads
/// `{name}_q{k}` declared into `decl` when `n` is a multiple of 4 (one vector load of the
/// constant bank per quad instead of four loads, each with its own address arithmetic, in
/// NVRTC's fast-compile PTX), else element by element. Either way the values and the
/// arithmetic that uses them are the same.
fn const_floats(base: &str, n: usize, name: &str, decl: &mut String) -> Vec<String> {
    if n == 0 || !n.is_multiple_of(4) {
        return (0..n).map(|c| format!("{base}[{c}]")).collect();
    }
    for k in 0..n / 4 {
        let _ = write!(
            decl,
            "const float4 {name}_q{k} = ((const float4*)({base}))[{k}]; "
        );
    }
    (0..n)
        .map(|c| format!("{name}_q{}.{}", c / 4, ['x', 'y', 'z', 'w'][c % 4]))
        .collect()
}

/// [`dense_row`] for row `r` of `m` known at compile time: constant-bank operands (the
/// row's weights as [`const_floats`] named `name`, declared into `decl`).
fn dense_row_at(
    m: &Matrix,
    r: usize,
    name: &str,
    decl: &mut String,
    x: impl Fn(usize) -> String,
) -> String {
    let (w, b) = matrix_names(m);
    let ws = const_floats(&format!("{w} + {}", r * m.cols), m.cols, name, decl);
    dense_row(
        m.bias.as_ref().map(|_| format!("{b}[{r}]")),
        m.cols,
        |c| ws[c].clone(),
        x,
    )
}

/// Declares `{name}` pointing at row `row` (a loop variable) of `m`'s weights, and returns
/// [`dense_row`] of that row (weights at constant offsets from one address, read as
/// [`const_floats`]).
fn dense_row_ptr(
    m: &Matrix,
    name: &str,
    row: &str,
    decl: &mut String,
    x: impl Fn(usize) -> String,
) -> String {
    let (w, b) = matrix_names(m);
    let _ = write!(decl, "const float* {name} = {w} + {row} * {}; ", m.cols);
    let ws = const_floats(name, m.cols, name, decl);
    dense_row(
        m.bias.as_ref().map(|_| format!("{b}[{row}]")),
        m.cols,
        |c| ws[c].clone(),
        x,
    )
}

/// The bytes of `__constant__` memory a module may hold (64 KiB on every architecture).
pub const CONSTANT_BYTES: usize = 64 * 1024;

/// The macro under which the generated source declares its `__constant__` arrays without
/// their values: NVRTC compiles with it defined (see [`super::nvrtc::nvrtc_options`]), so the
/// weights stay out of the PTX and CUBIN (NVRTC writes initialized arrays as decimal byte
/// lists, ~4.5 characters a byte) and the host fills them after loading the module from the
/// manifest's `constants`. Compiled without it (g++ in the emulation tests, or `nvcc` by
/// hand), the source is self-contained.
pub const UPLOAD_MACRO: &str = "MULO_UPLOAD_CONSTANTS";

/// One `__constant__` array of a program: what the host copies into the loaded module.
#[derive(Clone, Debug, PartialEq)]
pub struct ConstArray {
    /// Its symbol.
    pub name: String,
    /// What it holds, in words.
    pub label: String,
    /// Its values.
    pub values: Vec<f32>,
}

/// The `__constant__` arrays of the matrices the `Dense` nodes of `irs` use that `kernels`
/// (their rendered source) refers to: weights, biases and transposed weights, each distinct
/// matrix once, in a fixed order; or an error when they exceed [`CONSTANT_BYTES`].
pub fn constant_arrays<'a>(
    irs: impl IntoIterator<Item = &'a StepIr>,
    kernels: &str,
) -> Result<Vec<ConstArray>> {
    let mut seen: BTreeMap<String, &Matrix> = BTreeMap::new();
    for ir in irs {
        for node in &ir.nodes {
            if let Op::Dense { matrix, .. } = &node.op {
                let m = ir.matrix(*matrix);
                seen.entry(matrix_names(m).0).or_insert(m);
            }
        }
    }
    let mut out = Vec::new();
    let mut array = |name: String, values: Vec<f32>, label: String| {
        if kernels.contains(&name) {
            out.push(ConstArray {
                name,
                label,
                values,
            });
        }
    };
    for m in seen.values() {
        let (w, b) = matrix_names(m);
        let (rows, cols) = (m.rows, m.cols);
        array(
            w,
            m.weight.clone(),
            format!("{}: [{rows}, {cols}] weights", m.label),
        );
        let transposed: Vec<f32> = (0..cols)
            .flat_map(|c| (0..rows).map(move |r| (r, c)))
            .map(|(r, c)| m.w(r, c))
            .collect();
        array(
            transposed_name(m),
            transposed,
            format!("{}: [{cols}, {rows}] weights, transposed", m.label),
        );
        if let Some(bias) = &m.bias {
            array(b, bias.clone(), format!("{}: bias", m.label));
        }
    }
    let bytes: usize = out.iter().map(|a| 4 * a.values.len()).sum();
    if bytes > CONSTANT_BYTES {
        return Err(Error::backend(
            "cuda",
            format!("the program's matrices need {bytes} bytes of __constant__ memory, more than the {CONSTANT_BYTES} a module may hold"),
        ));
    }
    Ok(out)
}

/// The `__constant__` memory a program declares ([`constant_bytes`]), in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConstantMemory {
    /// The arrays declared for upload (under [`UPLOAD_MACRO`]): the meta-network's weights.
    pub weights: usize,
    /// The other arrays: the tables of rolled regions.
    pub tables: usize,
    /// The most alignment padding any placement of the arrays can need (`align - 1` per
    /// array): ptxas does not keep the order of declaration, so the exact padding is its own.
    pub padding: usize,
}

impl ConstantMemory {
    /// An upper bound of the module's constant bank (ptxas's `cmem[3]`): what is refused
    /// past [`CONSTANT_BYTES`], so that ptxas never is the one to refuse a program.
    pub fn total(&self) -> usize {
        self.weights + self.tables + self.padding
    }
}

/// The `__constant__` memory a program's `source` declares: every array at file scope (the
/// weights' arrays of [`constant_arrays`] and the tables of rolled regions, which may follow a
/// kernel's closing brace on its line). An error names a declaration whose type or size it
/// cannot read, so that nothing escapes the count.
pub fn constant_bytes(source: &str) -> Result<ConstantMemory> {
    let guard = format!("\n#ifndef {UPLOAD_MACRO}");
    let mut out = ConstantMemory {
        weights: 0,
        tables: 0,
        padding: 0,
    };
    for (at, _) in source.match_indices("__constant__ ") {
        let line_start = source[..at].rfind('\n').map_or(0, |i| i + 1);
        if source[line_start..at].contains("//") {
            continue; // a comment about them
        }
        let line_end = source[at..].find('\n').map_or(source.len(), |i| at + i);
        let decl = &source[at + "__constant__ ".len()..line_end];
        let bad = || {
            Error::backend(
                "cuda",
                format!("cannot account for the __constant__ declaration `{decl}`"),
            )
        };
        let (head, dims) = decl.split_once('[').ok_or_else(bad)?;
        let ty = head.trim().rsplit_once(' ').ok_or_else(bad)?.0.trim();
        let size = match ty {
            "int" | "unsigned" | "float" => 4,
            "double" | "long long" | "idx_t" => 8,
            _ => return Err(bad()),
        };
        // `[a][b]…`, then an initializer, an `__align__(n)` or nothing.
        let mut count = 1usize;
        let mut rest = dims;
        loop {
            let (n, after) = rest.split_once(']').ok_or_else(bad)?;
            count = count
                .checked_mul(n.trim().parse::<usize>().map_err(|_| bad())?)
                .ok_or_else(bad)?;
            match after.strip_prefix('[') {
                Some(next) => rest = next,
                None => {
                    rest = after;
                    break;
                }
            }
        }
        let align = match rest.split_once("__align__(") {
            Some((_, a)) => a
                .split_once(')')
                .and_then(|(a, _)| a.trim().parse::<usize>().ok())
                .ok_or_else(bad)?,
            None => size,
        };
        let bytes = size.checked_mul(count).ok_or_else(bad)?;
        if source[line_end..].starts_with(&guard) {
            out.weights += bytes;
        } else {
            out.tables += bytes;
        }
        out.padding += align.max(1) - 1;
    }
    Ok(out)
}

/// Refuses `source` (the program `what`) when its `__constant__` memory ([`constant_bytes`]:
/// the weights, the rolled regions' tables and their alignment) may exceed [`CONSTANT_BYTES`],
/// before NVRTC or ptxas see it.
pub fn check_constant_memory(source: &str, what: &str) -> Result<()> {
    let c = constant_bytes(source)?;
    if c.total() > CONSTANT_BYTES {
        return Err(Error::backend(
            "cuda",
            format!(
                "{what} needs up to {} bytes of __constant__ memory ({} for the meta-network's weights, {} for the tables of its rolled regions, up to {} of alignment), more than the {CONSTANT_BYTES} a module may hold; compile fewer distinct shapes into one program (split the model into several packed models)",
                c.total(),
                c.weights,
                c.tables,
                c.padding
            ),
        ));
    }
    Ok(())
}

/// Declarations of [`constant_arrays`], their values under `#ifndef` [`UPLOAD_MACRO`].
pub fn matrix_constants<'a>(
    irs: impl IntoIterator<Item = &'a StepIr>,
    kernels: &str,
) -> Result<String> {
    let mut out = String::new();
    for a in constant_arrays(irs, kernels)? {
        let _ = writeln!(
            out,
            "// {}\n__constant__ float {}[{}] __align__({CONSTANT_ALIGN})\n#ifndef {UPLOAD_MACRO}\n= {{",
            a.label,
            a.name,
            a.values.len()
        );
        for chunk in a.values.chunks(8) {
            let line: Vec<String> = chunk.iter().map(|&x| f32_literal(x)).collect();
            let _ = writeln!(out, "    {},", line.join(", "));
        }
        let _ = writeln!(out, "}}\n#endif\n;");
    }
    Ok(out)
}

/// Where lane `lane` (a number or an expression) of point `point` of a small node lies in the
/// scratch arena: lane-major, `off + lane · n + point` for a domain of `n` points, so that
/// threads reading one lane at consecutive points read consecutive floats (coalesced).
fn scratch_index(layout: &Layout, domain: Domain, off: usize, lane: &str, point: &str) -> String {
    let n = layout.domain_len(domain);
    if lane == "0" {
        format!("{off} + {point}")
    } else {
        format!("{off} + {lane} * {n} + {point}")
    }
}

/// Declares register `vN` read from the scratch arena at point index expression `idx`.
fn read_scratch(ir: &StepIr, s: &Schedule, v: ValueId, idx: &str, indent: &str, out: &mut String) {
    let node = ir.node(v);
    let off = s.scratch_offset[v.index()].unwrap_or(0);
    let w = node.width;
    let at = |l: u32| {
        scratch_index(
            &ir.layout,
            node.domain,
            off,
            &l.to_string(),
            &format!("({idx})"),
        )
    };
    if w == 1 {
        let _ = writeln!(out, "{indent}const float {v} = scratch[{}];", at(0));
    } else {
        let _ = writeln!(out, "{indent}float {v}[{w}];");
        for l in 0..w {
            let _ = writeln!(out, "{indent}{v}[{l}] = scratch[{}];", at(l));
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

/// [`buffer_index`] of lane `lane` at point `p` in a small kernel, spelled the same way for
/// every lane (`0 + p` for the first), so that the regions of different lanes can be rolled.
fn small_buffer_index(layout: &Layout, buffer: Buffer, lane: u32) -> String {
    format!("{} + p", lane as usize * layout.domain_len(buffer.domain()))
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
    let kernels = render_kernels(ir, s, Form::Global)?;
    src.push_str(&matrix_constants([ir], &kernels)?);
    src.push_str(&kernels);
    src.push('\n');
    check_constant_memory(&src, &format!("the CUDA program of {}", layout.shape()))?;
    Ok(src)
}

/// The C parameter list of every kernel of `layout` (without the packed-form prefix), then,
/// for a staged schedule of `rounds` rounds, the round buffers `mulo_round<r>` (f64).
fn params_text(layout: &Layout, rounds: usize) -> String {
    params(layout)
        .iter()
        .map(|p| format!("{} {}", p.c_type, p.name))
        .chain((0..rounds).map(|r| format!("double* __restrict__ {}", round_param(r))))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The kernel parameter (and table field) holding round `r`'s buffer of a staged schedule.
pub fn round_param(r: usize) -> String {
    format!("mulo_round{r}")
}

/// Renders every kernel of `s` in `form`, in launch order (no prelude).
pub fn render_kernels(ir: &StepIr, s: &Schedule, form: Form<'_>) -> Result<String> {
    let layout = &ir.layout;
    let env = template_env()?;
    // Only small kernels read or write the round buffers: elem kernels keep the unstaged
    // argument list (two more pointers put a device function's arguments on the stack).
    let small_params = params_text(layout, s.rounds());
    let elem_params = params_text(layout, 0);
    let device = matches!(form, Form::Device { .. });
    let signature = |name: &str, elem: bool| {
        let params_text = if elem { &elem_params } else { &small_params };
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
                        signature => signature(&k.name, true),
                        device => device,
                        block_index => block_index,
                        pass => pass,
                        summary => summary(ir, k),
                        numel => layout.numel(),
                        threads => BLOCK_THREADS,
                        reduces => !means.is_empty(),
                        blocks => t.blocks(),
                        outer_len => t.outer_len,
                        tiles_x => t.tiles_x,
                        tiles_y => t.tiles_y,
                        blocks_per_rest => t.blocks_per_rest(),
                        x_desc => match t.x_axis {
                            None => "virtual".to_string(),
                            Some(a) if t.inner_axes.is_empty() => format!("axis {a}"),
                            Some(a) => format!("axis {a} with inner axes {:?}", t.inner_axes),
                        },
                        y_axis => t.y_axis,
                        row_len => t.row_len(),
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
            KernelKind::Small {
                nodes,
                stores,
                blocks,
                chunked,
                round_out,
            } => {
                let tag = match form {
                    Form::Global => k.name.clone(),
                    Form::Device { prefix } => format!("{prefix}{}", k.name),
                };
                let work = SmallWork {
                    nodes,
                    stores,
                    blocks: *blocks,
                    chunked,
                    round_out: *round_out,
                };
                let (body, tables) = small_body(ir, s, &work, &tag)?;
                src.push_str(&tables);
                env.get_template("small")
                    .map_err(template_error)?
                    .render(context! {
                        name => k.name.clone(),
                        signature => signature(&k.name, false),
                        device => device,
                        summary => summary(ir, k),
                        threads => BLOCK_THREADS,
                        blocks => *blocks,
                        block_index => block_index,
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
        KernelKind::Small {
            nodes,
            round_out: Some(r),
            ..
        } => format!(
            "Sums {} cross-shard means over this shard into round {r}'s buffer.",
            nodes.len()
        ),
        KernelKind::Small {
            nodes,
            stores,
            chunked,
            ..
        } => format!(
            "{}Computes {} row/column/rest/step nodes into scratch{}.",
            if chunked.is_empty() {
                String::new()
            } else {
                format!(
                    "Sums one chunk of the values of {} means per block. ",
                    chunked.len()
                )
            },
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

/// The coordinate expressions of an elem kernel's element, by axis: Y is `iy`; X and the
/// inner rest axes come from the X' index `xp` (`ix`, or `ixs` clamped into the tensor; X
/// itself is `xp` when there is no inner axis), the outer rest axes from the block (`c{axis}`,
/// declared by the kernel). Points of a domain are found with [`elem_compose`].
fn elem_coords(layout: &Layout, t: &Tiling, xp: &str) -> BTreeMap<usize, String> {
    let mut coords = BTreeMap::new();
    if let Some(x) = t.x_axis {
        if t.inner_len == 1 {
            coords.insert(x, xp.to_string());
        } else {
            coords.insert(x, format!("({xp} / {})", t.inner_len));
            coords.extend(decompose(
                layout,
                &t.inner_axes,
                &format!("({xp} % {})", t.inner_len),
            ));
        }
    }
    coords.insert(t.y_axis, "iy".to_string());
    for &a in &t.outer_axes {
        coords.insert(a, format!("c{a}"));
    }
    coords
}

/// The index in `domain` of an elem kernel's point with coordinates `coords` (from
/// [`elem_coords`] with X' index `xp`). The inner axes, when a domain keeps them all, are
/// its last axes, contiguous: with X they are `xp` itself, without it `xp % inner_len`.
fn elem_compose(
    layout: &Layout,
    t: &Tiling,
    domain: Domain,
    coords: &BTreeMap<usize, String>,
    xp: &str,
) -> String {
    let axes = layout.domain_axes(domain);
    let Some(x) = t.x_axis else {
        return compose(layout, domain, coords);
    };
    if t.inner_len == 1 || !t.inner_axes.iter().all(|a| axes.contains(a)) {
        return compose(layout, domain, coords);
    }
    let mut terms = stride_terms(layout, domain, coords, |a| {
        a != x && !t.inner_axes.contains(&a)
    });
    terms.push(if axes.contains(&x) {
        xp.to_string()
    } else {
        format!("({xp} % {})", t.inner_len)
    });
    terms.join(" + ")
}

/// The element index of an elem kernel's thread: `ix` (X' has stride 1) plus Y's and the
/// outer axes' terms, in axis order.
fn elem_index(layout: &Layout, t: &Tiling) -> String {
    let (sy, outer) = t.strides(layout);
    let mut terms: Vec<(usize, String)> = Vec::new();
    if let Some(x) = t.x_axis {
        terms.push((x, "ix".to_string()));
    }
    let mut term = |a: usize, var: String, stride: usize| {
        if layout.dims()[a] > 1 {
            terms.push((
                a,
                if stride == 1 {
                    var
                } else {
                    format!("{var} * {stride}")
                },
            ));
        }
    };
    term(t.y_axis, "iy".to_string(), sy);
    for (a, stride) in outer {
        term(a, format!("c{a}"), stride);
    }
    terms.sort();
    if terms.is_empty() {
        "0".to_string()
    } else {
        terms
            .into_iter()
            .map(|t| t.1)
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

fn elem_holes(ir: &StepIr, s: &Schedule, means: &[ElemMean], stores: bool) -> Result<ElemHoles> {
    let layout = &ir.layout;
    let t = &s.tiling;
    let coords = elem_coords(layout, t, "ix");
    let mut rest_coords = String::new();
    for (a, e) in decompose(layout, &t.outer_axes, "rest") {
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
    let fusions = dense_fusions(ir, s, &nodes, &reads, &roots);
    let in_chain: BTreeSet<ValueId> = fusions.values().flatten().copied().collect();
    let ind = "            ";
    let mut body = String::new();
    // Small-domain values used only inside fused loops are read there, lane by lane.
    let mut read_outside: BTreeSet<ValueId> = BTreeSet::new();
    for &v in nodes.iter().filter(|v| !in_chain.contains(v)) {
        read_outside.extend(ir.node(v).op.operands());
    }
    // Values that do not change along Y (columns, rest points, the step) are read once per
    // thread, before its loop over the rows of the tile, at a clamped column (in bounds for
    // the threads past the tensor's edge, which store nothing).
    let mut hoisted = String::new();
    let hoisted_coords = elem_coords(layout, t, "ixs");
    if t.x_axis.is_some() {
        let _ = writeln!(
            hoisted,
            "    const idx_t ixs = ix < {len} ? ix : {last};",
            len = t.row_len(),
            last = t.row_len().saturating_sub(1)
        );
    }
    let mut any_hoisted = false;
    for &v in reads.iter().filter(|v| read_outside.contains(v)) {
        let domain = ir.node(v).domain;
        if layout.domain_axes(domain).contains(&t.y_axis) {
            let idx = elem_compose(layout, t, domain, &coords, "ix");
            read_scratch(ir, s, v, &idx, ind, &mut body);
        } else {
            let idx = elem_compose(layout, t, domain, &hoisted_coords, "ixs");
            read_scratch(ir, s, v, &idx, "    ", &mut hoisted);
            any_hoisted = true;
        }
    }
    if !any_hoisted {
        hoisted.clear();
    }
    for &v in &nodes {
        if in_chain.contains(&v) {
            continue;
        }
        if let Some(chain) = fusions.get(&v) {
            fused_dense(ir, s, v, chain, &coords, ind, &mut body)?;
            continue;
        }
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
    let mut acc_decls = hoisted;
    let mut val_decls = String::new();
    let mut per_row = String::new();
    let mut epilogue = String::new();
    let mut block_sums: Vec<BlockSum> = Vec::new();
    // Means reducing X but keeping the inner axes: the threads of one inner point in a row
    // of the tile are `inner_len` apart; a fixed shuffle tree (no barrier) sums them into
    // the first of them, a head (`tx < heads`), which writes its slot (`x_slots`).
    let r = t.inner_len;
    let heads = t.heads();
    let seg_tree = |v: &str| -> String {
        if r >= t.bx {
            String::new()
        } else {
            format!(
                "for (int o = {r}; o < {bx}; o <<= 1) {{ const double u = __shfl_down_sync(0xffffffffu, {v}, o, {bx}); if (tx + o < {bx}) {v} += u; }} ",
                bx = t.bx
            )
        }
    };
    let (slot, head_if) = if r <= t.bx {
        ("txt".to_string(), format!("tx < {heads}"))
    } else {
        (
            format!("(ix / {r})"),
            format!("ix < {len}", len = t.row_len()),
        )
    };
    let x_slots = t.x_slots();
    let row_len = t.row_len();
    for (i, m) in means.iter().enumerate() {
        let w = ir.node(m.node).width;
        let target = ir.node(m.node).domain;
        let n = layout.domain_len(target);
        let off = m.partial_offset;
        let idx = elem_compose(layout, t, target, &coords, "ix");
        for l in 0..w {
            let _ = writeln!(val_decls, "        float m{i}_{l} = 0.0f;");
            let _ = writeln!(body, "{ind}m{i}_{l} = {};", operand(ir, m.operand, l));
            match m.kind {
                PartialKind::KeepY if r == 1 => {
                    let _ = writeln!(
                        per_row,
                        "        {{ const double s = mulo_sum_x((double)m{i}_{l}, {bx}); if (tx == 0 && iy < {ny}) partials[{off} + (txt * {n} + {idx}) * {w} + {l}] = s; }}",
                        bx = t.bx,
                        ny = t.ny,
                    );
                }
                PartialKind::KeepY => {
                    let _ = writeln!(
                        per_row,
                        "        {{ double s = (double)m{i}_{l}; {tree}if ({head_if} && iy < {ny}) partials[{off} + ({slot} * {n} + {idx}) * {w} + {l}] = s; }}",
                        tree = seg_tree("s"),
                        ny = t.ny,
                    );
                }
                PartialKind::KeepX => {
                    let _ = writeln!(acc_decls, "    double a{i}_{l} = 0.0;");
                    let _ = writeln!(per_row, "        a{i}_{l} += (double)m{i}_{l};");
                    // Threads tid < bx are those of row ty = 0: their ix is the point's.
                    block_sums.push(BlockSum {
                        acc: format!("a{i}_{l}"),
                        span: t.bx,
                        store: format!(
                            "if (ix < {row_len}) partials[{off} + (tyt * {n} + {idx}) * {w} + {l}] = s;"
                        ),
                    });
                }
                PartialKind::KeepInner => {
                    let _ = writeln!(acc_decls, "    double a{i}_{l} = 0.0;");
                    let _ = writeln!(per_row, "        a{i}_{l} += (double)m{i}_{l};");
                    let tree = seg_tree(&format!("a{i}_{l}"));
                    if !tree.is_empty() {
                        let _ = writeln!(epilogue, "    {tree}");
                    }
                    // Then over the rows of the block, as KeepX: threads tid < heads (row 0)
                    // hold the sums of their inner points.
                    block_sums.push(BlockSum {
                        acc: format!("a{i}_{l}"),
                        span: t.bx,
                        store: format!(
                            "if ({head_if}) partials[{off} + ((tyt * {x_slots} + {slot}) * {n} + {idx}) * {w} + {l}] = s;"
                        ),
                    });
                }
                PartialKind::Blocks => {
                    let _ = writeln!(acc_decls, "    double a{i}_{l} = 0.0;");
                    let _ = writeln!(per_row, "        a{i}_{l} += (double)m{i}_{l};");
                    block_sums.push(BlockSum {
                        acc: format!("a{i}_{l}"),
                        span: 1,
                        store: format!("partials[{off} + blk * {w} + {l}] = s;"),
                    });
                }
            }
        }
    }
    block_sum_epilogue(&block_sums, &mut epilogue);
    Ok(ElemHoles {
        rest_coords,
        acc_decls,
        val_decls,
        elem_index: elem_index(layout, t),
        body,
        per_row,
        epilogue,
    })
}

/// The dense layers of an elem kernel computed in a loop over their input lanes: for a
/// `Dense` node `D` (a key), the chain of element nodes (in topological order) that computes
/// its input and is used by nothing else: lane-wise unary and binary nodes of `D`'s input
/// width `H`, and dense layers with `H` rows, whose other operands are width-1 values or
/// width-`H` small-domain values in scratch. Lane `r` of the chain needs only lane `r` of its
/// operands and of the chain's dense layers (row `r` of their matrices), so the chain is
/// computed one lane at a time, each lane accumulated into every output of `D` at once: a
/// rolled loop whose weights come from `__constant__` memory, instead of `H × rows` unrolled
/// multiply-adds, with the interpreter's order of operations (bias, then the columns in order).
fn dense_fusions(
    ir: &StepIr,
    s: &Schedule,
    nodes: &[ValueId],
    reads: &BTreeSet<ValueId>,
    roots: &[ValueId],
) -> BTreeMap<ValueId, Vec<ValueId>> {
    let mut users: BTreeMap<ValueId, Vec<ValueId>> = BTreeMap::new();
    for &v in nodes {
        for o in ir.node(v).op.operands() {
            users.entry(o).or_default().push(v);
        }
    }
    let roots: BTreeSet<ValueId> = roots.iter().copied().collect();
    let mut fusions: BTreeMap<ValueId, Vec<ValueId>> = BTreeMap::new();
    let mut taken: BTreeSet<ValueId> = BTreeSet::new();
    for &d in nodes {
        let Op::Dense { matrix, x } = &ir.node(d).op else {
            continue;
        };
        let h = ir.matrix(*matrix).cols as u32;
        let mut chain: BTreeSet<ValueId> = BTreeSet::new();
        let mut stack = vec![*x];
        let mut ok = true;
        while let Some(c) = stack.pop() {
            if chain.contains(&c) {
                continue;
            }
            let node = ir.node(c);
            if node.domain != Domain::Elem
                || node.width != h
                || taken.contains(&c)
                || fusions.contains_key(&c)
                || roots.contains(&c)
            {
                ok = false;
                break;
            }
            let operands = match &node.op {
                Op::Unary(_, a) => vec![*a],
                Op::Binary(_, a, b) => vec![*a, *b],
                Op::Dense { .. } => {
                    // Its input stays in registers, computed before the loop.
                    chain.insert(c);
                    continue;
                }
                _ => {
                    ok = false;
                    break;
                }
            };
            chain.insert(c);
            for a in operands {
                let an = ir.node(a);
                if an.domain == Domain::Elem && an.width == h && !is_inlined_operand(&an.op) {
                    stack.push(a);
                } else if an.width == 1
                    || (an.domain != Domain::Elem
                        && an.width == h
                        && reads.contains(&a)
                        && s.scratch_offset[a.index()].is_some())
                {
                    // Broadcast, or read lane by lane from scratch inside the loop.
                } else {
                    ok = false;
                    break;
                }
            }
            if !ok {
                break;
            }
        }
        // Dense layers of the chain read inputs computed before the loop, not in it.
        ok =
            ok && chain.iter().all(|&c| match &ir.node(c).op {
                Op::Dense { x, .. } => !chain.contains(x),
                _ => true,
            }) && chain.iter().all(|c| {
                users
                    .get(c)
                    .is_some_and(|us| us.iter().all(|u| *u == d || chain.contains(u)))
            });
        if ok {
            taken.extend(chain.iter().copied());
            fusions.insert(d, chain.into_iter().collect());
        }
    }
    fusions
}

fn is_inlined_operand(op: &Op) -> bool {
    matches!(op, Op::Const(_) | Op::Scalar(_))
}

/// Renders the fused dense layer `d` and its input chain (see [`dense_fusions`]).
fn fused_dense(
    ir: &StepIr,
    s: &Schedule,
    d: ValueId,
    chain: &[ValueId],
    coords: &BTreeMap<usize, String>,
    ind: &str,
    out: &mut String,
) -> Result<()> {
    let layout = &ir.layout;
    let node = ir.node(d);
    let Op::Dense { matrix, x } = &node.op else {
        return Err(Error::Verify(format!("{d}: not a dense layer")));
    };
    let m = ir.matrix(*matrix);
    let b = matrix_names(m).1;
    let h = m.cols;
    let note = node.note.as_deref().unwrap_or(&m.label);
    let _ = writeln!(
        out,
        "{ind}// {d} = {note}, lane by lane over its {h} inputs ({} computed in the loop)",
        chain
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(out, "{ind}float {d}[{}];", m.rows);
    let mut decl = String::new();
    let bias = match m.bias {
        Some(_) => const_floats(&b, m.rows, &format!("{d}_b"), &mut decl),
        None => vec!["0.0f".to_string(); m.rows],
    };
    if !decl.is_empty() {
        let _ = writeln!(out, "{ind}{{ {decl}");
    }
    for (k, init) in bias.iter().enumerate() {
        let _ = writeln!(out, "{ind}{d}[{k}] = {init};");
    }
    if !decl.is_empty() {
        let _ = writeln!(out, "{ind}}}");
    }
    let lane = |o: &ValueId| -> String {
        let on = ir.node(*o);
        if chain.contains(o) {
            format!("{o}_r")
        } else if on.width == 1 || is_inlined_operand(&on.op) {
            operand(ir, *o, 0)
        } else {
            format!("{o}_s[mulo_r * {}]", layout.domain_len(on.domain))
        }
    };
    // Small-domain vectors the chain reads lane by lane: one address each, before the loop.
    let mut vectors: BTreeSet<ValueId> = BTreeSet::new();
    for &c in chain {
        for o in ir.node(c).op.operands() {
            let on = ir.node(o);
            let lanewise = matches!(ir.node(c).op, Op::Unary(..) | Op::Binary(..));
            if lanewise && !chain.contains(&o) && on.domain != Domain::Elem && on.width > 1 {
                vectors.insert(o);
            }
        }
    }
    for o in vectors {
        let on = ir.node(o);
        let off = s.scratch_offset[o.index()]
            .ok_or_else(|| Error::Verify(format!("{o}: fused operand not in scratch")))?;
        let idx = elem_compose(layout, &s.tiling, on.domain, coords, "ix");
        let _ = writeln!(out, "{ind}const float* {o}_s = scratch + {off} + ({idx});");
    }
    let _ = writeln!(out, "{ind}#pragma unroll 1");
    let _ = writeln!(out, "{ind}for (int mulo_r = 0; mulo_r < {h}; ++mulo_r) {{");
    for &c in chain {
        let cn = ir.node(c);
        let mut decl = String::new();
        let e = match &cn.op {
            Op::Dense { matrix, x } => dense_row_ptr(
                ir.matrix(*matrix),
                &format!("{c}_w"),
                "mulo_r",
                &mut decl,
                |col| operand(ir, *x, col as u32),
            ),
            op => lanewise_expr(op, lane)
                .ok_or_else(|| Error::Verify(format!("{c}: {op:?} is not lane-wise")))?,
        };
        let _ = writeln!(
            out,
            "{ind}    {decl}const float {c}_r = {e};  // {}",
            cn.note.as_deref().unwrap_or("")
        );
    }
    // Column `mulo_r` of the weights, contiguous in the transposed copy, one float at a time:
    // read as `float4` quads (all 32 up front), they gave the rank-4 plan of a packed
    // program's update a 56 B stack frame with spills in the runtime's CUBIN (sm_90).
    let _ = writeln!(
        out,
        "{ind}    const float* {d}_w = {} + mulo_r * {};",
        transposed_name(m),
        m.rows
    );
    for k in 0..m.rows {
        let _ = writeln!(
            out,
            "{ind}    {d}[{k}] = {d}[{k}] + {d}_w[{k}] * {};",
            lane(x)
        );
    }
    let _ = writeln!(out, "{ind}}}");
    Ok(())
}

/// A per-thread f64 accumulator of an elem kernel summed over the block: over the threads that
/// share `tid % span` (`span` = bx: the threads of one column of the tile; 1: all of them).
struct BlockSum {
    /// The accumulator variable.
    acc: String,
    /// A power of two ≤ 32.
    span: usize,
    /// The statement storing the sum `s` (run by thread `tid` < span, holding its column).
    store: String,
}

/// The end of a reduce pass: every accumulator is summed within each warp by a butterfly of
/// shuffles (no barrier), the warps' sums meet in shared memory (one barrier), and threads
/// `tid < span` add up the warps' values in warp order and store them. Deterministic: fixed
/// trees, no atomics. When the accumulators need more than the block's shared memory
/// (`BLOCK_THREADS` doubles), they go in groups with one more barrier between groups.
fn block_sum_epilogue(sums: &[BlockSum], out: &mut String) {
    let warps = BLOCK_THREADS / 32;
    let mut groups: Vec<Vec<(&BlockSum, usize)>> = vec![Vec::new()];
    let mut used = 0;
    for b in sums {
        let size = warps * b.span;
        if used + size > BLOCK_THREADS {
            groups.push(Vec::new());
            used = 0;
        }
        groups.last_mut().expect("a group").push((b, used));
        used += size;
    }
    for (g, group) in groups.iter().filter(|g| !g.is_empty()).enumerate() {
        if g > 0 {
            let _ = writeln!(out, "    __syncthreads();");
        }
        // Four sums of one span at evenly spaced bases (consecutive in the group): one call.
        let mut rest: &[(&BlockSum, usize)] = group;
        while !rest.is_empty() {
            let (b, base) = rest[0];
            let stride = warps * b.span;
            let four = rest.len() >= 4
                && (1..4).all(|k| rest[k].0.span == b.span && rest[k].1 == base + k * stride);
            if four {
                let accs: Vec<&str> = rest[..4].iter().map(|(b, _)| b.acc.as_str()).collect();
                let _ = writeln!(
                    out,
                    "    mulo_warp_sum4({}, {span}, mulo_smem + {base}, {stride});",
                    accs.join(", "),
                    span = b.span
                );
                rest = &rest[4..];
            } else {
                let _ = writeln!(
                    out,
                    "    mulo_warp_sum({acc}, {span}, mulo_smem + {base});",
                    acc = b.acc,
                    span = b.span
                );
                rest = &rest[1..];
            }
        }
        let _ = writeln!(out, "    __syncthreads();");
        // The stores of evenly spaced sums are one loop ([`roll`], without tables).
        let stores: Vec<String> = group
            .iter()
            .map(|&(b, base)| {
                format!(
                    "    if (tid < {span}) {{ const double s = mulo_warps_total(mulo_smem + {base}, {span}, tid); {store} }}\n",
                    span = b.span,
                    store = b.store
                )
            })
            .collect();
        out.push_str(&roll(None, "mulo_i", &stores).0);
    }
}

/// How the threads of a small kernel visit the points of a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spread {
    /// One block: its threads visit every point.
    Block,
    /// A multi-block kernel of this many blocks: each point once, over all of them
    /// ([`spread_run`]).
    Grid(usize),
}

/// Opens the region in which the threads of a small kernel visit the `n` points of a domain
/// as `p`. In one block: one point per thread without a loop when `n` fits in the block
/// (NVRTC's compile time grows much faster with the number of loops than with straight-line
/// code), else a block-strided loop. Over many blocks: at most one point per thread (the grid
/// has enough threads), spread as [`spread_run`] says. Closed by `}`.
fn open_points(n: usize, spread: Spread) -> String {
    let t = BLOCK_THREADS;
    match spread {
        Spread::Block if n <= t => format!("    if (tid < {n}) {{ const idx_t p = tid;\n"),
        Spread::Block => format!("    for (idx_t p = tid; p < {n}; p += {t}) {{\n"),
        Spread::Grid(g) => {
            let c = spread_run(n, g);
            let p = if c == 1 {
                format!("blk + (idx_t){g} * tid")
            } else {
                format!("(idx_t)(tid % {c}) + {c} * (blk + (idx_t){g} * (tid / {c}))")
            };
            format!("    if (const idx_t p = {p}; p < {n}) {{\n")
        }
    }
}

/// Whether a small node is computed point by point from values of its own point (grouped with
/// its neighbours of the same domain into one region without barriers).
/// The terms of the small-domain mean `v` of `a` at point `p`: their number `count` per
/// point, `a`'s scratch offset and domain length, and the index in `a`'s domain of term `k`.
fn small_mean_terms(
    ir: &StepIr,
    s: &Schedule,
    v: ValueId,
    a: ValueId,
) -> Result<(usize, usize, usize, String)> {
    let layout = &ir.layout;
    let from = ir.node(a).domain;
    let d = ir.node(v).domain;
    let from_axes = layout.domain_axes(from);
    let to_axes = layout.domain_axes(d);
    let reduced: Vec<usize> = from_axes
        .iter()
        .copied()
        .filter(|x| !to_axes.contains(x))
        .collect();
    let count = layout.mean_count(from, d);
    let mut coords = decompose(layout, &to_axes, "p");
    coords.extend(decompose(layout, &reduced, "k"));
    let aidx = compose(layout, from, &coords);
    let aoff = s.scratch_offset[a.index()]
        .ok_or_else(|| Error::Verify(format!("{a}: mean operand not in scratch")))?;
    Ok((count, aoff, layout.domain_len(from), aidx))
}

/// The element mean `v` as the elem kernel reducing it describes it.
fn elem_mean_of(s: &Schedule, v: ValueId) -> Result<&ElemMean> {
    s.kernels
        .iter()
        .filter_map(|k| match &k.kind {
            KernelKind::Elem { means, .. } => means.iter().find(|m| m.node == v),
            _ => None,
        })
        .next()
        .ok_or_else(|| Error::Verify(format!("{v}: element mean without partials")))
}

fn is_pointwise(ir: &StepIr, v: ValueId) -> bool {
    !matches!(
        ir.node(v).op,
        Op::Mean(_) | Op::Load { .. } | Op::Store { .. } | Op::Const(_) | Op::Scalar(_)
    )
}

/// What one small kernel computes ([`KernelKind::Small`]).
struct SmallWork<'a> {
    nodes: &'a [ValueId],
    stores: &'a [ValueId],
    blocks: usize,
    chunked: &'a [ValueId],
    round_out: Option<usize>,
}

/// Where a mean's sums go: divided by the count into scratch (lane-major), or, in a round-out
/// kernel, undivided into the round's buffer (`[point][lane]`). `p` is the point (`0` for a
/// one-point domain); the statement assigns the f64 sum `s`.
fn mean_sink(
    ir: &StepIr,
    s: &Schedule,
    v: ValueId,
    round_out: Option<usize>,
    count: &str,
) -> Result<impl Fn(usize, &str) -> String> {
    let node = ir.node(v);
    let (n, w) = (ir.layout.domain_len(node.domain), node.width as usize);
    let off = s.scratch_offset[v.index()]
        .ok_or_else(|| Error::Verify(format!("{v}: small node without a scratch slot")))?;
    let round = match round_out {
        Some(r) => {
            let slot = s
                .round_of
                .get(&v)
                .filter(|slot| slot.round == r)
                .ok_or_else(|| Error::Verify(format!("{v}: not a mean of round {r}")))?;
            Some((round_param(r), slot.offset))
        }
        None => None,
    };
    let count = count.to_string();
    Ok(move |l: usize, p: &str| match &round {
        Some((buf, ro)) if p == "0" => format!("{buf}[{ro} + {l}] = s"),
        Some((buf, ro)) => format!("{buf}[{ro} + {p} * {w} + {l}] = s"),
        None if p == "0" && n == 1 => format!("scratch[{off} + {l}] = (float)(s / {count})"),
        None => format!("scratch[{off} + {l} * {n} + {p}] = (float)(s / {count})"),
    })
}

/// The body of a small kernel, and the declarations of the `__constant__` tables its rolled
/// regions read ([`roll`], named after `tag`).
fn small_body(
    ir: &StepIr,
    s: &Schedule,
    work: &SmallWork<'_>,
    tag: &str,
) -> Result<(String, String)> {
    let &SmallWork {
        nodes,
        stores,
        blocks,
        chunked,
        round_out,
    } = work;
    let layout = &ir.layout;
    let t = BLOCK_THREADS;
    let spread = if blocks > 1 {
        Spread::Grid(blocks)
    } else {
        Spread::Block
    };
    // Barriers between regions only in one block: over many blocks a region reads only values
    // of its own points (this thread's) or of earlier kernels.
    let barrier = if blocks > 1 {
        ""
    } else {
        "    __syncthreads();\n"
    };
    let open_points = |n: usize| open_points(n, spread);
    let mut out = String::new();
    // This block's chunk of the values of the chunked means: a fixed contiguous range,
    // summed by a fixed tree: each sum within each warp by a butterfly of shuffles, the
    // warps' sums in shared memory (one barrier), added up in warp order by thread 0 (as
    // [`block_sum_epilogue`]). Each sum is a region of its own, so that runs of them roll.
    let warps = BLOCK_THREADS / 32;
    let mut chunk_sums: Vec<(String, String)> = Vec::new();
    for &v in chunked {
        let (g, co) = *s
            .chunks
            .get(&v)
            .ok_or_else(|| Error::Verify(format!("{v}: chunked mean without chunk sums")))?;
        let node = ir.node(v);
        let w = node.width as usize;
        let n = layout.domain_len(node.domain);
        // The values of lane `l` and point `p` are the terms `k` of `value(k, l)`.
        let (k, value): (usize, Box<dyn Fn(usize) -> String>) = match &node.op {
            Op::Mean(a) if ir.node(*a).domain == Domain::Elem => {
                let m = elem_mean_of(s, v)?;
                let po = m.partial_offset;
                (
                    m.partials_per_point,
                    Box::new(move |l| format!("partials[{po} + k * {w} + {l}]")),
                )
            }
            Op::Mean(a) => {
                let (count, aoff, nfrom, aidx) = small_mean_terms(ir, s, v, *a)?;
                (
                    count,
                    Box::new(move |l| {
                        format!("(double)scratch[{aoff} + {l} * {nfrom} + ({aidx})]")
                    }),
                )
            }
            _ => return Err(Error::Verify(format!("{v}: only means are chunked"))),
        };
        for p in 0..n {
            for l in 0..w {
                let base = (chunk_sums.len() % (BLOCK_THREADS / warps)) * warps;
                let sum = format!(
                    "    // {v}: chunk blk of its {k} values of lane {l} at point {p} ({g} chunks)\n    {{ const idx_t p = {p}; (void)p; const idx_t lo = blk * {k} / {g}, hi = (blk + 1) * {k} / {g}; double q = 0.0; for (idx_t k = lo + tid; k < hi; k += {t}) q += {}; mulo_warp_sum(q, 1, mulo_smem + {base}); }}\n",
                    value(l)
                );
                let store = format!(
                    "    if (tid < 1) {{ const double s = mulo_warps_total(mulo_smem + {base}, 1, tid); partials[{co} + (blk * {n} + {p}) * {w} + {l}] = s; }}\n"
                );
                chunk_sums.push((sum, store));
            }
        }
    }
    let mut chunk_tables = String::new();
    for (c, group) in chunk_sums.chunks(BLOCK_THREADS / warps).enumerate() {
        if c > 0 {
            let _ = writeln!(out, "    __syncthreads();");
        }
        let sums: Vec<String> = group.iter().map(|g| g.0.clone()).collect();
        let (text, tables) = roll(Some(&format!("{tag}_c{c}")), "mulo_i", &sums);
        out.push_str(&text);
        chunk_tables.push_str(&tables);
        let _ = writeln!(out, "    __syncthreads();");
        let stores: Vec<String> = group.iter().map(|g| g.1.clone()).collect();
        let (text, tables) = roll(Some(&format!("{tag}_s{c}")), "mulo_i", &stores);
        out.push_str(&text);
        chunk_tables.push_str(&tables);
    }
    // Where each region (a block of C and its barrier) starts in `out`: runs of isomorphic
    // ones are rolled into loops at the end.
    let prelude = out.len();
    let mut marks: Vec<usize> = Vec::new();
    let mut group_tables = chunk_tables;
    // Consecutive pointwise nodes of one domain share a region: each thread computes them
    // for its points in registers (and into scratch for later kernels and other domains),
    // with one barrier after the group instead of one per node.
    let mut i = 0;
    while i < nodes.len() {
        marks.push(out.len());
        let v = nodes[i];
        if is_pointwise(ir, v) {
            let d = ir.node(v).domain;
            let mut j = i;
            while j < nodes.len() && is_pointwise(ir, nodes[j]) && ir.node(nodes[j]).domain == d {
                j += 1;
            }
            small_group(
                ir,
                s,
                &nodes[i..j],
                spread,
                &format!("{tag}_g{i}"),
                &mut out,
                &mut group_tables,
            )?;
            out.push_str(barrier);
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
            Op::Mean(_) if round_out.is_none() && s.round_of.contains_key(&v) => {
                // A cross mean: the sums of every shard, combined by the host, over the whole
                // tensor's count.
                let slot = s.round_of[&v];
                let (buf, ro) = (round_param(slot.round), slot.offset);
                let count = f64_literal(slot.count as f64);
                out.push_str(&open_points(n));
                for l in 0..w {
                    let _ = writeln!(out, "        scratch[{off} + {l} * {n} + p] = (float)({buf}[{ro} + p * {w} + {l}] / {count});");
                }
                let _ = writeln!(out, "    }}");
            }
            Op::Mean(a) if ir.node(*a).domain == Domain::Elem => {
                let m = elem_mean_of(s, v)?;
                let count = f64_literal(layout.mean_count(Domain::Elem, d) as f64);
                let put = mean_sink(ir, s, v, round_out, &count)?;
                let (po, k) = (m.partial_offset, m.partials_per_point);
                match m.kind {
                    PartialKind::KeepX | PartialKind::KeepY | PartialKind::KeepInner => {
                        out.push_str(&open_points(n));
                        for l in 0..w {
                            let _ = writeln!(out, "        {{ double s = 0.0; for (idx_t k = 0; k < {k}; ++k) s += partials[{po} + (k * {n} + p) * {w} + {l}]; {}; }}", put(l, "p"));
                        }
                        let _ = writeln!(out, "    }}");
                    }
                    PartialKind::Blocks if n == 1 && s.chunks.contains_key(&v) => {
                        let (g, co) = s.chunks[&v];
                        for l in 0..w {
                            let _ = writeln!(out, "    {{ double s = 0.0; for (idx_t k = tid; k < {g}; k += {t}) s += partials[{co} + k * {w} + {l}]; s = mulo_block_sum(s, mulo_smem); if (tid == 0) {}; }}", put(l, "0"));
                        }
                    }
                    PartialKind::Blocks if n == 1 => {
                        for l in 0..w {
                            let _ = writeln!(out, "    {{ double s = 0.0; for (idx_t k = tid; k < {k}; k += {t}) s += partials[{po} + k * {w} + {l}]; s = mulo_block_sum(s, mulo_smem); if (tid == 0) {}; }}", put(l, "0"));
                        }
                    }
                    PartialKind::Blocks => {
                        out.push_str(&open_points(n));
                        for l in 0..w {
                            let _ = writeln!(out, "        {{ double s = 0.0; for (idx_t k = 0; k < {k}; ++k) s += partials[{po} + (p * {k} + k) * {w} + {l}]; {}; }}", put(l, "p"));
                        }
                        let _ = writeln!(out, "    }}");
                    }
                }
            }
            Op::Mean(a) => {
                let (count, aoff, nfrom, aidx) = small_mean_terms(ir, s, v, *a)?;
                let cnt = f64_literal(count as f64);
                let put = mean_sink(ir, s, v, round_out, &cnt)?;
                if let Some(&(g, co)) = s.chunks.get(&v) {
                    let _ = writeln!(out, "    for (idx_t p = 0; p < {n}; ++p) {{");
                    for l in 0..w {
                        let _ = writeln!(out, "        {{ double s = 0.0; for (idx_t k = tid; k < {g}; k += {t}) s += partials[{co} + (k * {n} + p) * {w} + {l}]; s = mulo_block_sum(s, mulo_smem); if (tid == 0) {}; }}", put(l, "p"));
                    }
                    let _ = writeln!(out, "    }}");
                    out.push_str(barrier);
                    continue;
                }
                if n >= 64 {
                    out.push_str(&open_points(n));
                    for l in 0..w {
                        let _ = writeln!(out, "        {{ double s = 0.0; for (idx_t k = 0; k < {count}; ++k) s += (double)scratch[{aoff} + {l} * {nfrom} + ({aidx})]; {}; }}", put(l, "p"));
                    }
                    let _ = writeln!(out, "    }}");
                } else {
                    let _ = writeln!(out, "    for (idx_t p = 0; p < {n}; ++p) {{");
                    for l in 0..w {
                        let _ = writeln!(out, "        {{ double s = 0.0; for (idx_t k = tid; k < {count}; k += {t}) s += (double)scratch[{aoff} + {l} * {nfrom} + ({aidx})]; s = mulo_block_sum(s, mulo_smem); if (tid == 0) {}; }}", put(l, "p"));
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
                    small_buffer_index(layout, *buffer, *lane)
                );
                let _ = writeln!(out, "    }}");
            }
            _ => return Err(Error::Verify(format!("{v}: not computed into scratch"))),
        }
        out.push_str(barrier);
    }
    for &v in stores {
        marks.push(out.len());
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
            small_buffer_index(layout, *buffer, *lane),
            operand(ir, *value, 0)
        );
        let _ = writeln!(out, "    }}");
    }
    marks.push(out.len());
    let regions: Vec<String> = marks
        .windows(2)
        .map(|w| out[w[0]..w[1]].to_string())
        .collect();
    let (body, tables) = roll(Some(tag), "mulo_i", &regions);
    out.truncate(prelude);
    out.push_str(&body);
    Ok((out, group_tables + &tables))
}

/// The code of one node `v` of a small region (its points `p`, coordinates `coords`, `n` of
/// them): operands not in `in_registers` read from scratch, the node computed, written to
/// scratch, and added to `in_registers` when it stays in registers.
fn group_node(
    ir: &StepIr,
    s: &Schedule,
    v: ValueId,
    coords: &BTreeMap<usize, String>,
    n: usize,
    in_registers: &mut BTreeSet<ValueId>,
    out: &mut String,
) -> Result<()> {
    let layout = &ir.layout;
    let node = ir.node(v);
    let w = node.width as usize;
    let off = s.scratch_offset[v.index()]
        .ok_or_else(|| Error::Verify(format!("{v}: small node without a scratch slot")))?;
    // A lane-wise node of several lanes is a rolled loop over its lanes, from scratch to
    // scratch (its wide operands too: this thread wrote them, or an earlier kernel did),
    // instead of one line per lane in registers.
    let lane_loop = w > 1 && matches!(node.op, Op::Unary(..) | Op::Binary(..));
    for o in node.op.operands() {
        if lane_loop && ir.node(o).width > 1 {
            continue;
        }
        if s.scratch_offset[o.index()].is_some() && in_registers.insert(o) {
            let idx = compose(layout, ir.node(o).domain, coords);
            read_scratch(ir, s, o, &idx, "        ", out);
        }
    }
    if lane_loop {
        if let Some(o) = node
            .op
            .operands()
            .into_iter()
            .find(|o| ir.node(*o).width > 1 && s.scratch_offset[o.index()].is_none())
        {
            return Err(Error::Verify(format!(
                "{v}: operand {o} of several lanes not in scratch"
            )));
        }
        let e = lanewise_expr(&node.op, |&o| {
            if ir.node(o).width == 1 {
                return operand(ir, o, 0);
            }
            let ooff = s.scratch_offset[o.index()].unwrap_or(0);
            let idx = compose(layout, ir.node(o).domain, coords);
            let at = scratch_index(
                layout,
                ir.node(o).domain,
                ooff,
                "mulo_l",
                &format!("({idx})"),
            );
            format!("scratch[{at}]")
        })
        .ok_or_else(|| Error::Verify(format!("{v}: {:?} is not lane-wise", node.op)))?;
        let note = node
            .note
            .as_ref()
            .map(|n| format!("  // {n}"))
            .unwrap_or_default();
        let _ = writeln!(out, "        #pragma unroll 1{note}");
        let _ = writeln!(
            out,
            "        for (int mulo_l = 0; mulo_l < {w}; ++mulo_l) scratch[{off} + mulo_l * {n} + p] = {e};"
        );
        return Ok(());
    }
    if let Op::Dense { matrix, x } = &node.op {
        // A rolled loop over the rows, straight into scratch; its users in this region
        // read it back (this thread wrote it).
        let m = ir.matrix(*matrix);
        let mut decl = String::new();
        let row = dense_row_ptr(m, "mulo_wr", "mulo_r", &mut decl, |c| {
            operand(ir, *x, c as u32)
        });
        let _ = writeln!(out, "        #pragma unroll 1");
        let _ = writeln!(
            out,
            "        for (int mulo_r = 0; mulo_r < {w}; ++mulo_r) {{ {decl}scratch[{off} + mulo_r * {n} + p] = {row}; }}"
        );
        return Ok(());
    }
    compute_node(ir, v, "        ", out)?;
    in_registers.insert(v);
    for l in 0..w {
        let _ = writeln!(
            out,
            "        scratch[{off} + {l} * {n} + p] = {};",
            operand(ir, v, l as u32)
        );
    }
    Ok(())
}

/// One region computing the pointwise small nodes `group` (all on one domain) for every
/// point. Two forms, the smaller kept: operands of the group in registers, the others from
/// scratch, every node also written to scratch; or each node a block of its own reading its
/// operands from scratch (this thread wrote them), so that runs of the same nodes up to
/// constants are rolled into loops ([`roll`], tables named after `tag`, declared in `tables`).
fn small_group(
    ir: &StepIr,
    s: &Schedule,
    group: &[ValueId],
    spread: Spread,
    tag: &str,
    out: &mut String,
    tables: &mut String,
) -> Result<()> {
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
    out.push_str(&open_points(n, spread));
    let coords = decompose(layout, &layout.domain_axes(d), "p");
    let mut in_registers: BTreeSet<ValueId> = BTreeSet::new();
    let mut shared = String::new();
    for &v in group {
        group_node(ir, s, v, &coords, n, &mut in_registers, &mut shared)?;
    }
    let mut blocks = Vec::new();
    for &v in group {
        let mut b = String::from("        {\n");
        group_node(ir, s, v, &coords, n, &mut BTreeSet::new(), &mut b)?;
        b.push_str("        }\n");
        blocks.push(b);
    }
    let (rolled, decls) = roll(Some(tag), "mulo_j", &blocks);
    if rolled.contains("for (int mulo_j") && rolled.len() + decls.len() < shared.len() {
        out.push_str(&rolled);
        tables.push_str(&decls);
    } else {
        out.push_str(&shared);
    }
    let _ = writeln!(out, "    }}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `__constant__` array at file scope counts, with its alignment's worst padding: an
    /// uploaded weights array (`__align__(16)`), tables after a closing brace on one line,
    /// `long long` and `double` tables; a comment does not; an unknown type is an error.
    #[test]
    fn constant_bytes_count_every_declaration() {
        let src = format!(
            "// about the __constant__ arrays [1]\n__constant__ int k_roll0_int[3][1] = {{\n    {{1}},\n}};\n\
             __constant__ float mulo_w_x[5] __align__(16)\n#ifndef {UPLOAD_MACRO}\n= {{ 1.0f }}\n#endif\n;\n\
             }}__constant__ double k_roll1_double[2][3] = {{\n}};\n__constant__ long long k_roll2_long[1][1] = {{ }};\n"
        );
        let want = ConstantMemory {
            weights: 20,
            tables: 12 + 48 + 8,
            padding: 3 + 15 + 7 + 7,
        };
        assert_eq!(constant_bytes(&src).unwrap(), want);
        let err = constant_bytes("__constant__ half h[2];\n").unwrap_err();
        assert!(err.to_string().contains("`half h[2];`"), "{err}");
        let over = format!("__constant__ float big[16381] __align__(16)\n#ifndef {UPLOAD_MACRO}\n");
        let err = check_constant_memory(&over, "the program of 7").unwrap_err();
        assert!(
            err.to_string()
                .contains("the program of 7 needs up to 65539 bytes of __constant__ memory (65524 for the meta-network's weights, 0 for"),
            "{err}"
        );
        check_constant_memory(&over.replace("16381", "16380"), "the program of 7").unwrap();
    }

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
    fn dense_layers_are_loops_over_constant_weights() {
        use crate::lopt::LearnedOptimizer;
        for shape in ["64x32", "37", "16x8x3x3"] {
            let ir = crate::compile_step(
                &crate::shape::Shape::parse(shape).unwrap(),
                &LearnedOptimizer::demo(),
            )
            .unwrap();
            let src = render(&ir, &super::super::schedule::schedule(&ir)).unwrap();
            let weights: usize = ir.matrices.iter().map(|m| m.weight.len()).sum();
            // Every weight is data, declared once; the code reads rows or columns of it in
            // loops instead of spelling out one product per weight.
            let kernels = &src[src.find("extern \"C\"").unwrap()..];
            let products = kernels.matches("mulo_w").count();
            assert!(
                products * 8 < weights,
                "{shape}: {products} weight reads for {weights} weights"
            );
            let spelled = ir
                .matrices
                .iter()
                .flat_map(|m| &m.weight)
                .filter(|&&w| kernels.contains(&f32_literal(w)))
                .count();
            assert!(
                spelled * 8 < weights,
                "{shape}: {spelled} of {weights} weights spelled out in the kernels"
            );
            // The first-layer chain and the hidden layer are fused into one loop per element.
            assert!(src.contains("lane by lane over its 32 inputs"), "{shape}");
        }
    }

    #[test]
    fn constant_runs_of_four_are_read_as_float4() {
        let mut decl = String::new();
        let xs = const_floats("w + 8", 8, "v3_w", &mut decl);
        assert_eq!(
            decl,
            "const float4 v3_w_q0 = ((const float4*)(w + 8))[0]; const float4 v3_w_q1 = ((const float4*)(w + 8))[1]; "
        );
        assert_eq!(xs[0], "v3_w_q0.x");
        assert_eq!(xs[5], "v3_w_q1.y");
        assert_eq!(xs[7], "v3_w_q1.w");
        // Not a multiple of 4: element by element, nothing declared.
        let mut decl = String::new();
        let xs = const_floats("b", 6, "v4_b", &mut decl);
        assert!(decl.is_empty());
        assert_eq!(xs[5], "b[5]");
    }

    #[test]
    fn reduce_passes_have_at_most_two_barriers() {
        use crate::lopt::LearnedOptimizer;
        for shape in [
            "64x32", "37", "16x8x3x3", "1x300", "scalar", "5x7x3", "6x5x3x3", "9x8x6x6",
        ] {
            let ir = crate::compile_step(
                &crate::shape::Shape::parse(shape).unwrap(),
                &LearnedOptimizer::demo(),
            )
            .unwrap();
            let s = super::super::schedule::schedule(&ir);
            let src = render_kernels(&ir, &s, Form::Global).unwrap();
            let mut reduces = 0;
            for kernel in src.split("extern \"C\"").skip(1) {
                if !kernel.contains("_reduce(") {
                    continue;
                }
                reduces += 1;
                let barriers = kernel.matches("__syncthreads").count();
                assert!(barriers <= 2, "{shape}: {barriers} barriers in\n{kernel}");
                // No helper with barriers of its own: the only helpers called shuffle.
                for call in kernel.split("mulo_").skip(1) {
                    let name: String = call
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if call[name.len()..].starts_with('(') && !name.ends_with("_reduce") {
                        assert!(
                            ["warp_sum", "warp_sum4", "warps_total", "sum_x"]
                                .contains(&name.as_str()),
                            "{shape}: calls mulo_{name}"
                        );
                    }
                }
            }
            assert_eq!(reduces, s.elem_passes - 1, "{shape}");
        }
    }

    /// The generated elem kernels index the element as the tiling says
    /// (`Tiling::element`, checked for coalescing in the schedule's tests): threadIdx.x is
    /// `tx`, the X' index is `txt · bx + tx`, and it enters the element index with stride 1.
    #[test]
    fn elem_kernels_index_along_x_prime_with_stride_one() {
        use crate::lopt::LearnedOptimizer;
        use crate::shape::{FactoredAxes, Shape};
        for (shape, axes, bx, e) in [
            ("scalar", None, 1, "0"),
            ("37", None, 1, "iy"),
            ("64x32", None, 32, "iy * 32 + ix"),
            ("16x8x3x3", None, 32, "iy * 72 + ix"),
            ("64x3x7x7", Some((0, 2)), 32, "iy * 147 + c1 * 49 + ix"),
            (
                "7x3x7x7",
                Some((2, 3)),
                8,
                "c0 * 147 + c1 * 49 + iy * 7 + ix",
            ),
            ("5x7x3", None, 32, "iy * 21 + ix"),
        ] {
            let axes = axes.map(|(d0, d1)| FactoredAxes { d0, d1 });
            let layout = Layout::with_axes(Shape::parse(shape).unwrap(), axes).unwrap();
            let ir = crate::compile_layout(&layout, &LearnedOptimizer::demo()).unwrap();
            let s = super::super::schedule::schedule(&ir);
            let src = render_kernels(&ir, &s, Form::Global).unwrap();
            let mut elem = 0;
            for kernel in src.split("extern \"C\"").skip(1) {
                if !kernel.contains(") mulo_elem_") {
                    continue;
                }
                elem += 1;
                for line in [
                    format!("const int tx = tid % {bx};"),
                    format!("const idx_t ix = txt * {bx} + tx;"),
                    format!("const idx_t e = {e};"),
                ] {
                    assert!(kernel.contains(&line), "{shape}: no `{line}` in\n{kernel}");
                }
            }
            assert_eq!(elem, s.elem_passes, "{shape}");
        }
    }

    #[test]
    fn column_values_are_read_once_per_thread_lane_major() {
        use crate::lopt::LearnedOptimizer;
        let ir = crate::compile_step(
            &crate::shape::Shape::parse("64x32").unwrap(),
            &LearnedOptimizer::demo(),
        )
        .unwrap();
        let s = super::super::schedule::schedule(&ir);
        let src = render_kernels(&ir, &s, Form::Global).unwrap();
        let update = src.split("extern \"C\"").last().unwrap();
        assert!(update.contains("_update("));
        let (before, in_loop) = update.split_once("for (int j = 0;").unwrap();
        // Column (x = axis 1) and step values are loaded before the loop over the rows...
        assert!(
            before.contains("scratch[") && before.contains("(ixs)]"),
            "{before}"
        );
        // ...and inside it, every load from scratch depends on the row.
        for line in in_loop.lines().filter(|l| l.contains("= scratch[")) {
            assert!(
                line.contains("iy"),
                "loop-invariant load in the loop: {line}"
            );
        }
        // A vector read lane by lane in the fused loop: lanes one domain length apart.
        assert!(
            in_loop.contains("_s[mulo_r * 32]") && in_loop.contains("_s[mulo_r * 64]"),
            "{in_loop}"
        );
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
