//! CEL expressions for Limitador-format limits, compiled once when a limit set is applied.
//!
//! The context holds one variable, `descriptors`: a list with one map per request descriptor,
//! from entry key to entry value, as Limitador builds it.

use std::collections::HashMap;
use std::sync::Arc;

use super::command::Descriptor;

/// A compiled CEL expression and the source it came from.
#[derive(Clone)]
pub struct CelExpr {
    source: String,
    program: Arc<cel::Program>,
}

impl std::fmt::Debug for CelExpr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CelExpr({:?})", self.source)
    }
}

/// Compiles `source`, or says why it is not valid CEL.
pub fn compile(source: &str) -> Result<CelExpr, String> {
    // Checked before parsing: the parser recurses per level and could exhaust the stack of
    // whichever thread applies the limit set.
    let depth = nesting(source);
    if depth > MAX_CEL_NESTING {
        return Err(format!(
            "brackets and operators nested {depth} deep, more than the {MAX_CEL_NESTING} allowed"
        ));
    }
    let program = cel::Program::compile(source).map_err(|e| e.to_string())?;
    Ok(CelExpr {
        source: source.to_owned(),
        program: Arc::new(program),
    })
}

/// The evaluation context of one request.
pub fn request_context(descriptors: &[Descriptor]) -> cel::Context<'static, 'static> {
    let list: Vec<cel::Value> = descriptors
        .iter()
        .map(|d| {
            let map: HashMap<String, String> = d.entries.iter().cloned().collect();
            cel::Value::from(map)
        })
        .collect();
    let mut ctx = cel::Context::default();
    ctx.add_variable_from_value("descriptors", cel::Value::List(list.into()));
    ctx
}

impl CelExpr {
    pub fn source(&self) -> &str {
        &self.source
    }

    /// True only when the expression evaluates to boolean `true`; a missing key, a type
    /// error or a non-boolean result counts as false (the limit does not apply).
    pub fn holds(&self, ctx: &cel::Context<'_, '_>) -> bool {
        matches!(self.program.execute(ctx), Ok(cel::Value::Bool(true)))
    }

    /// The expression's value as a counter-key part, or `None` when it does not evaluate
    /// (the limit does not apply, as in Limitador).
    pub fn value(&self, ctx: &cel::Context<'_, '_>) -> Option<String> {
        match self.program.execute(ctx).ok()? {
            cel::Value::String(s) => Some(s.as_ref().clone()),
            cel::Value::Int(i) => Some(i.to_string()),
            cel::Value::UInt(u) => Some(u.to_string()),
            cel::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

/// Deepest nesting a CEL expression may have. The CEL parser recurses per bracket level and
/// per prefix or ternary operator, spending over 100 KiB of stack per level in debug builds,
/// and the engine compiles on whatever thread applies the limit set; real conditions nest two
/// or three levels.
pub const MAX_CEL_NESTING: usize = 8;

/// A bound on the parser's recursion: the deepest nesting of `(`, `[` and `{`, plus every
/// `?`, `!` and `-` (each may open a recursive parse), all outside string literals.
pub fn nesting(expr: &str) -> usize {
    let bytes = expr.as_bytes();
    let (mut depth, mut max, mut operators, mut i) = (0usize, 0usize, 0usize, 0usize);
    while i < bytes.len() {
        match bytes[i] {
            b'(' | b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'?' | b'-' => operators += 1,
            // `!=` is a comparison, not a prefix operator.
            b'!' if bytes.get(i + 1) != Some(&b'=') => operators += 1,
            q @ (b'\'' | b'"') => {
                let triple = bytes.get(i + 1) == Some(&q) && bytes.get(i + 2) == Some(&q);
                let close: &[u8] = if triple { &[q, q, q] } else { &[q] };
                i += close.len();
                while i < bytes.len() && !bytes[i..].starts_with(close) {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += close.len() - 1;
            }
            _ => {}
        }
        i += 1;
    }
    max + operators
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deepest expressions the bound lets through compile on a thread with the 2 MiB
    /// stack Rust gives new threads, in this (possibly debug) build.
    #[test]
    fn allowed_nesting_compiles_on_an_ordinary_stack() {
        let n = MAX_CEL_NESTING;
        let worst = [
            format!("{}1{}", "(".repeat(n), ")".repeat(n)),
            format!("{}true", "!".repeat(n)),
            format!("{}1", "-".repeat(n)),
            format!("{}1", "true ? ".repeat(n / 2) + &"1 : ".repeat(n / 2)),
            format!("{}1{}", "[".repeat(n), "]".repeat(n)),
        ];
        for expr in worst {
            assert!(nesting(&expr) <= n, "{expr}");
            let compiled = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || compile(&expr).map(|_| ()))
                .unwrap()
                .join()
                .expect("no stack overflow");
            let _ = compiled;
        }
        assert!(compile(&format!("{}true", "!".repeat(n + 1))).is_err());
        assert!(compile(&"a ? ".repeat(100)).is_err());
    }
}
