//! Tool calls: the tools a request offers, and Step3's steptml argument strings cast to the JSON
//! types each tool's schema declares.

use serde_json::{Map, Value};
use step3::ToolCall;

/// The `arguments` JSON object of a call: each parameter string cast to the type its schema
/// (`parameters.properties.<name>.type`) declares: integer, number, boolean, object, array, null,
/// else the string as written. A value that does not parse as its type stays a string. A call
/// without arguments gives `{}`.
pub fn cast_arguments(call: &ToolCall, parameters: Option<&Value>) -> Value {
    let props = parameters.and_then(|p| p.get("properties")).and_then(Value::as_object);
    let mut out = Map::new();
    for (name, raw) in &call.arguments {
        let schema = props.and_then(|p| p.get(name));
        out.insert(name.clone(), cast(raw, schema));
    }
    Value::Object(out)
}

fn types_of(schema: Option<&Value>) -> Vec<String> {
    let Some(s) = schema else { return Vec::new() };
    let mut out = Vec::new();
    match s.get("type") {
        Some(Value::String(t)) => out.push(t.clone()),
        Some(Value::Array(ts)) => out.extend(ts.iter().filter_map(Value::as_str).map(str::to_string)),
        _ => {}
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(alts)) = s.get(key) {
            for a in alts {
                out.extend(types_of(Some(a)));
            }
        }
    }
    out
}

fn cast(raw: &str, schema: Option<&Value>) -> Value {
    let types = types_of(schema);
    let t = raw.trim();
    for ty in &types {
        let v = match ty.as_str() {
            "integer" | "int" => t.parse::<i64>().ok().map(Value::from),
            "number" | "float" => t.parse::<f64>().ok().and_then(serde_json::Number::from_f64).map(Value::Number),
            "boolean" | "bool" => match t.to_ascii_lowercase().as_str() {
                "true" => Some(Value::Bool(true)),
                "false" => Some(Value::Bool(false)),
                _ => None,
            },
            "object" | "array" => {
                serde_json::from_str::<Value>(t).ok().filter(|v| v.is_object() == (ty == "object") || v.is_array())
            }
            "null" if t == "null" => Some(Value::Null),
            "string" => Some(Value::String(raw.to_string())),
            _ => None,
        };
        if let Some(v) = v {
            return v;
        }
    }
    Value::String(raw.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_take_their_schema_types() {
        let params = serde_json::json!({"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "temp": {"type": "number"},
            "metric": {"type": "boolean"}, "opts": {"type": "object"}, "tags": {"type": "array"},
            "maybe": {"type": ["integer", "null"]}, "either": {"anyOf": [{"type": "number"}, {"type": "string"}]}
        }});
        let call = ToolCall {
            name: "f".into(),
            arguments: [
                ("city", "Paris <Nord>\nline 2"),
                ("days", " 3 "),
                ("temp", "21.5"),
                ("metric", "True"),
                ("opts", "{\"a\": 1}"),
                ("tags", "[1, \"x\"]"),
                ("maybe", "null"),
                ("either", "oops"),
                ("unknown", "42"),
                ("days_bad", "x"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        };
        let v = cast_arguments(&call, Some(&params));
        assert_eq!(
            v,
            serde_json::json!({"city": "Paris <Nord>\nline 2", "days": 3, "temp": 21.5, "metric": true,
                "opts": {"a": 1}, "tags": [1, "x"], "maybe": null, "either": "oops", "unknown": "42", "days_bad": "x"})
        );
        let none = ToolCall { name: "now".into(), arguments: Vec::new() };
        assert_eq!(cast_arguments(&none, None), serde_json::json!({}));
    }
}
