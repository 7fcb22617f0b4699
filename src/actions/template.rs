//! `${...}` templates in step parameters: `${input.userId}`, `${steps.fetch.body.items}`,
//! `${env.CMS_API_URL}`, `${run.id}`. A string that is exactly one template becomes the value it
//! names (an object stays an object); templates inside longer strings are replaced by their text.
//! A path that names nothing is an error naming the template, so a typo fails the step clearly.

use serde_json::Value;

/// What templates can name.
pub struct Scope<'a> {
    pub input: &'a Value,
    pub steps: &'a serde_json::Map<String, Value>,
    pub run: Value,
}

impl Scope<'_> {
    fn lookup(&self, path: &str) -> Result<Value, String> {
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or("");
        let (mut value, rest): (Value, Vec<&str>) = match root {
            "input" => (self.input.clone(), parts.collect()),
            "run" => (self.run.clone(), parts.collect()),
            "steps" => {
                let step = parts.next().ok_or_else(|| format!("`${{{path}}}` names no step"))?;
                let output = self.steps.get(step).ok_or_else(|| {
                    format!("`${{{path}}}`: step `{step}` has no output (not run yet, or no such step)")
                })?;
                (output.clone(), parts.collect())
            }
            "env" => {
                // `${env.NAME:-default}`: the default when NAME is unset or empty.
                let name: Vec<&str> = parts.collect();
                let name = name.join(".");
                let (name, default) = match name.split_once(":-") {
                    Some((name, default)) => (name.to_owned(), Some(default.to_owned())),
                    None => (name, None),
                };
                return match (std::env::var(&name).ok().filter(|v| !v.is_empty()), default) {
                    (Some(value), _) => Ok(Value::String(value)),
                    (None, Some(default)) => Ok(Value::String(default)),
                    (None, None) => Err(format!("`${{env.{name}}}`: the environment variable {name} is not set")),
                };
            }
            other => return Err(format!("`${{{path}}}`: unknown root `{other}` (input, steps, env, run)")),
        };
        for part in rest {
            value = match value {
                Value::Object(mut map) => map.remove(part),
                Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.into_iter().nth(i)),
                _ => None,
            }
            .unwrap_or(Value::Null);
        }
        Ok(value)
    }
}

/// The text a value stands for inside a longer string.
fn as_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Renders the templates of a string.
pub fn render_str(text: &str, scope: &Scope) -> Result<String, String> {
    Ok(as_text(&render_string(text, scope)?))
}

fn render_string(text: &str, scope: &Scope) -> Result<Value, String> {
    let trimmed = text.trim();
    if trimmed.starts_with("${") && trimmed.ends_with('}') && trimmed[2..].find('}') == Some(trimmed.len() - 3) {
        return scope.lookup(trimmed[2..trimmed.len() - 1].trim());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("unclosed template in `{text}`"))?;
        out.push_str(&as_text(&scope.lookup(after[..end].trim())?));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

/// Renders every string inside a JSON value.
pub fn render_value(value: &Value, scope: &Scope) -> Result<Value, String> {
    Ok(match value {
        Value::String(text) => render_string(text, scope)?,
        Value::Array(items) => Value::Array(items.iter().map(|v| render_value(v, scope)).collect::<Result<_, _>>()?),
        Value::Object(map) => Value::Object(
            map.iter().map(|(k, v)| Ok((k.clone(), render_value(v, scope)?))).collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// Whether a value counts as true for `when`: not null, false, 0, "", "false", [] or {}.
pub fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !(s.is_empty() || s == "false" || s == "0"),
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
    }
}

/// Evaluates a `when` condition: a template (truthy or not), or `<template> == <text>` /
/// `<template> != <text>` comparing the rendered value's text.
pub fn condition(text: &str, scope: &Scope) -> Result<bool, String> {
    for (operator, equal) in [("==", true), ("!=", false)] {
        if let Some((left, right)) = text.split_once(operator) {
            let left = render_str(left.trim(), scope)?;
            let right = render_str(right.trim().trim_matches('"'), scope)?;
            return Ok((left == right) == equal);
        }
    }
    Ok(truthy(&render_string(text, scope)?))
}

/// Whether a text holds a template naming earlier steps' outputs.
pub fn mentions_steps(text: &str) -> bool {
    text.contains("${steps.") || text.contains("${ steps.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with_scope<T>(f: impl FnOnce(&Scope) -> T) -> T {
        let input = json!({ "userId": 7, "tags": ["a", "b"] });
        let mut steps = serde_json::Map::new();
        steps.insert("fetch".to_owned(), json!({ "body": { "items": [1, 2], "next": null } }));
        f(&Scope { input: &input, steps: &steps, run: json!({ "id": "r1" }) })
    }

    #[test]
    fn whole_templates_keep_their_type_and_inner_ones_become_text() {
        with_scope(|scope| {
            assert_eq!(render_value(&json!("${steps.fetch.body.items}"), scope).unwrap(), json!([1, 2]));
            assert_eq!(render_str("/users/${input.userId}?tag=${input.tags.1}", scope).unwrap(), "/users/7?tag=b");
            assert_eq!(
                render_value(&json!({ "u": "${input.userId}", "n": 3 }), scope).unwrap(),
                json!({ "u": 7, "n": 3 })
            );
            assert_eq!(render_str("${run.id}", scope).unwrap(), "r1");
        });
    }

    #[test]
    fn mistakes_are_named() {
        with_scope(|scope| {
            assert!(render_str("${steps.nope.x}", scope).unwrap_err().contains("`nope`"));
            assert!(render_str("${secret.x}", scope).unwrap_err().contains("unknown root"));
            assert!(render_str("${env.WFO_SURELY_UNSET_VARIABLE}", scope).unwrap_err().contains("not set"));
            assert_eq!(render_str("${env.WFO_SURELY_UNSET_VARIABLE:-fallback}", scope).unwrap(), "fallback");
            assert_eq!(render_str("${env.WFO_SURELY_UNSET_VARIABLE:-}", scope).unwrap(), "");
            assert!(render_str("${input.userId", scope).unwrap_err().contains("unclosed"));
        });
    }

    #[test]
    fn conditions_compare_text() {
        with_scope(|scope| {
            assert!(condition("${input.userId} == 7", scope).unwrap());
            assert!(condition("${run.id} != r2", scope).unwrap());
            assert!(!condition("${input.userId} == \"8\"", scope).unwrap());
            assert!(condition("${steps.fetch.body.items}", scope).unwrap());
            assert!(!condition("${steps.fetch.body.next}", scope).unwrap());
        });
    }

    #[test]
    fn truthiness() {
        assert!(!truthy(&json!(null)) && !truthy(&json!(false)) && !truthy(&json!("")) && !truthy(&json!(0)));
        assert!(truthy(&json!(true)) && truthy(&json!("yes")) && truthy(&json!([1])));
    }
}
