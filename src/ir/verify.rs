//! The IR's invariants, checked after the frontend and after every pass.

use super::{Buffer, Op, StepIr};
use crate::error::{Error, Result};
use std::collections::BTreeSet;

/// Checks that `ir` is well formed:
/// - operands precede their users, and every domain exists for the layout;
/// - an operand's domain is contained in its user's (broadcast only widens), a `Mean` strictly
///   narrows, loads and stores sit on their buffer's domain;
/// - widths agree (lane-wise ops, `Dense` input = matrix columns, `Pack` of width-1 values);
/// - the parameter and every state lane are stored exactly once, the gradient never.
pub fn verify(ir: &StepIr) -> Result<()> {
    let fail = |i: usize, msg: String| Err(Error::Verify(format!("v{i}: {msg}")));
    let buffers = Buffer::for_layout(&ir.layout);
    let mut stored = BTreeSet::new();
    for (i, node) in ir.nodes.iter().enumerate() {
        if !ir.layout.has_domain(node.domain) {
            return fail(
                i,
                format!("domain {} does not exist for this layout", node.domain),
            );
        }
        for operand in node.op.operands() {
            if operand.index() >= i {
                return fail(i, format!("operand {operand} does not precede its user"));
            }
            let od = ir.node(operand).domain;
            let nested = match node.op {
                Op::Mean(_) => od.contains(node.domain) && od != node.domain,
                _ => node.domain.contains(od),
            };
            if !nested {
                return fail(
                    i,
                    format!(
                        "operand {operand} on {od} does not fit a node on {}",
                        node.domain
                    ),
                );
            }
            if matches!(node.op, Op::Store { .. }) && ir.node(operand).width != 1 {
                return fail(i, format!("stored value {operand} must have width 1"));
            }
        }
        let width_of = |v: super::ValueId| ir.node(v).width;
        let ok = match &node.op {
            Op::Load { buffer, lane } | Op::Store { buffer, lane, .. } => {
                if !buffers.contains(buffer) {
                    return fail(i, format!("buffer {buffer} does not exist for this layout"));
                }
                if *lane as usize >= buffer.lanes() || node.domain != buffer.domain() {
                    return fail(i, format!("bad lane {lane} or domain for buffer {buffer}"));
                }
                if let Op::Store { buffer, lane, .. } = node.op {
                    if buffer == Buffer::Grad {
                        return fail(i, "the gradient is read-only".into());
                    }
                    if !stored.insert((buffer, lane)) {
                        return fail(i, format!("{buffer}[{lane}] is stored twice"));
                    }
                }
                node.width == matches!(node.op, Op::Load { .. }) as u32
            }
            Op::Scalar(_) | Op::Const(_) => {
                node.width == 1 && node.domain == crate::shape::Domain::Step
            }
            Op::Unary(_, a) | Op::Mean(a) => node.width == width_of(*a),
            Op::Binary(_, a, b) => {
                let (wa, wb) = (width_of(*a), width_of(*b));
                wa == wb && node.width == wa
            }
            Op::Pack(xs) => xs.iter().all(|&x| width_of(x) == 1) && node.width as usize == xs.len(),
            Op::Dense { matrix, x } => {
                let Some(m) = ir.matrices.get(matrix.0 as usize) else {
                    return fail(i, format!("unknown matrix {matrix}"));
                };
                let bias_ok = m.bias.as_ref().is_none_or(|b| b.len() == m.rows);
                bias_ok
                    && m.weight.len() == m.rows * m.cols
                    && width_of(*x) as usize == m.cols
                    && node.width as usize == m.rows
            }
            Op::Lane { x, lane } => node.width == 1 && *lane < width_of(*x),
        };
        if !ok {
            return fail(i, format!("widths do not agree in {:?}", node.op));
        }
    }
    for buffer in buffers.into_iter().filter(|b| *b != Buffer::Grad) {
        for lane in 0..buffer.lanes() as u32 {
            if !stored.contains(&(buffer, lane)) {
                return Err(Error::Verify(format!("{buffer}[{lane}] is never stored")));
            }
        }
    }
    Ok(())
}
