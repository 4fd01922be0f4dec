//! How the configuration layers combine: the embedded default, then a file, then `KVDEX_*`
//! variables, each checked against the default's keys and types so that a typo or a wrong type
//! is refused with the key's name instead of being ignored.

use super::*;

/// True for `KVDEX_SECTION__KEY` variables; `KVDEX_LOG` (the log filter) and variables without
/// a section separator are not configuration keys.
pub(super) fn is_override_var(var: &str) -> bool {
    var.strip_prefix(ENV_PREFIX)
        .is_some_and(|rest| rest.contains("__"))
}

/// `KVDEX_HTTP__LISTEN` -> `http.listen`.
pub(super) fn env_key(var: &str) -> String {
    var[ENV_PREFIX.len()..]
        .to_ascii_lowercase()
        .replace("__", ".")
}

/// Looks `key` (dotted) up in the default table.
pub(super) fn lookup<'a>(default: &'a Table, key: &str) -> Option<&'a Value> {
    let mut parts = key.split('.');
    let mut cur = default.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_table()?.get(p)?;
    }
    Some(cur)
}

/// Parses an environment string as the type the default has at `key`.
pub(super) fn parse_env_value(default: &Table, key: &str, raw: &str) -> Result<Value, String> {
    let Some(template) = lookup(default, key) else {
        return Err(format!("unknown key `{key}`"));
    };
    match template {
        Value::String(_) => Ok(Value::String(raw.to_string())),
        Value::Integer(_) => raw
            .trim()
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| format!("key `{key}`: expected an integer, got {raw:?}")),
        Value::Boolean(_) => match raw.trim() {
            "true" | "1" => Ok(Value::Boolean(true)),
            "false" | "0" => Ok(Value::Boolean(false)),
            _ => Err(format!("key `{key}`: expected true or false, got {raw:?}")),
        },
        Value::Float(_) => raw
            .trim()
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| format!("key `{key}`: expected a number, got {raw:?}")),
        Value::Table(_) => Err(format!("`{key}` is a section, not a key")),
        Value::Array(_) | Value::Datetime(_) => {
            Err(format!("key `{key}` cannot be set from the environment"))
        }
    }
}

/// Sets dotted `key` in `table` (the key is known to exist in the default).
pub(super) fn set_key(table: &mut Table, key: &str, value: Value) -> Result<()> {
    let (section, name) = key
        .rsplit_once('.')
        .ok_or_else(|| KvdexError::Config(format!("`{key}` is not a section.key")))?;
    let mut cur = table;
    for p in section.split('.') {
        cur = cur
            .get_mut(p)
            .and_then(Value::as_table_mut)
            .ok_or_else(|| KvdexError::Config(format!("unknown section `{section}`")))?;
    }
    cur.insert(name.to_string(), value);
    Ok(())
}

/// Every integer key is a count or a size: a negative one is refused here, by name (serde's
/// own message would not say which key).
pub(super) fn refuse_negative(table: &Table, prefix: &str) -> Result<()> {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            Value::Integer(i) if *i < 0 => return Err(bad(&key, format!("{i} is negative"))),
            Value::Table(t) => refuse_negative(t, &key)?,
            _ => {}
        }
    }
    Ok(())
}

pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a number",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "an array",
        Value::Table(_) => "a section",
    }
}

/// Merges `over` into `into`, refusing keys absent from `default` and values whose type differs.
pub(super) fn merge(
    into: &mut Table,
    default: &Table,
    over: Table,
    prefix: &str,
) -> Result<(), String> {
    for (name, value) in over {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        let Some(template) = default.get(&name) else {
            return Err(format!("unknown key `{key}`"));
        };
        match (template, value) {
            (Value::Table(dt), Value::Table(ot)) => {
                let Some(Value::Table(it)) = into.get_mut(&name) else {
                    return Err(format!("`{key}` is not a section"));
                };
                merge(it, dt, ot, &key)?;
            }
            (t, v) if std::mem::discriminant(t) == std::mem::discriminant(&v) => {
                into.insert(name, v);
            }
            (t, v) => {
                return Err(format!(
                    "key `{key}`: expected {}, got {}",
                    type_name(t),
                    type_name(&v)
                ));
            }
        }
    }
    Ok(())
}
