//! The stable, readable text form of the IR.
//!
//! ```text
//! v12 : elem x1 = mul v3, v11          # feature 6: M_1 · rsqrt(V + 1e-6)
//! ```
//! Matrices are listed with their shape and a SHA-256 of their values rather than every weight,
//! so the text stays short and still changes when any weight does.

use super::{Op, StepIr};
use crate::digest::{f32_bytes, sha256_hex};
use std::fmt::Write;

pub(super) fn render(ir: &StepIr) -> String {
    let mut out = String::new();
    let layout = &ir.layout;
    let _ = writeln!(out, "mulo step ir, version 1");
    let _ = writeln!(out, "shape {}", layout.shape());
    match layout.factored() {
        Some(f) => {
            let _ = writeln!(out, "factored d0={} d1={}", f.d0, f.d1);
        }
        None => {
            let _ = writeln!(out, "unfactored");
        }
    }
    let _ = writeln!(out, "optimizer {}", ir.lopt_fingerprint);
    for d in layout.domains() {
        let _ = writeln!(out, "domain {:<4} {:?}", d.name(), layout.domain_shape(d));
    }
    for b in ir.buffers() {
        let _ = writeln!(out, "buffer {:<7} {:?}", b.name(), b.shape(layout));
    }
    for (i, m) in ir.matrices.iter().enumerate() {
        let mut bytes: Vec<f32> = m.weight.clone();
        if let Some(b) = &m.bias {
            bytes.extend_from_slice(b);
        }
        let _ = writeln!(
            out,
            "matrix w{i} [{}x{}]{} sha256:{}  # {}",
            m.rows,
            m.cols,
            if m.bias.is_some() { " +bias" } else { "" },
            &sha256_hex([f32_bytes(&bytes).as_slice()])[..16],
            m.label
        );
    }
    for (i, node) in ir.nodes.iter().enumerate() {
        let rhs = match &node.op {
            Op::Load { buffer, lane } => format!("load {buffer}[{lane}]"),
            Op::Scalar(s) => format!("scalar {}", s.name()),
            Op::Const(c) => format!("const {c:e}"),
            Op::Unary(u, a) => format!("{} {a}", u.name()),
            Op::Binary(b, x, y) => format!("{} {x}, {y}", b.name()),
            Op::Mean(a) => format!("mean {a}"),
            Op::Pack(xs) => format!(
                "pack {}",
                xs.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Op::Dense { matrix, x } => format!("dense {matrix}, {x}"),
            Op::Lane { x, lane } => format!("lane {x}[{lane}]"),
            Op::Store {
                buffer,
                lane,
                value,
            } => format!("store {buffer}[{lane}], {value}"),
        };
        let lhs = if matches!(node.op, Op::Store { .. }) {
            format!("     : {:<4}   ", node.domain.name())
        } else {
            format!("v{i:<3} : {:<4} x{:<2}", node.domain.name(), node.width)
        };
        let line = format!("{lhs} = {rhs}");
        match &node.note {
            Some(note) => {
                let _ = writeln!(out, "{line:<48} # {note}");
            }
            None => {
                let _ = writeln!(out, "{line}");
            }
        }
    }
    out
}
