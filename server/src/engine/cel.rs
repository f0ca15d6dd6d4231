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
