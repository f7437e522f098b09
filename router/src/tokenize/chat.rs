//! Chat templates compiled as transformers' `apply_chat_template` renders
//! them (see the parent module): trimmed blocks, Python's methods, its
//! `tojson`, `raise_exception` and `strftime_now`.

use serde_json::Value;

use super::TokenizeError;

/// A chat template compiled as transformers renders it (see the module).
pub(super) fn chat_env(template: String) -> Result<minijinja::Environment<'static>, TokenizeError> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_function("strftime_now", |format: String| {
        strftime(&format, std::time::SystemTime::now())
    });
    env.add_filter("tojson", tojson);
    env.add_template_owned("chat", template)
        .map_err(|e| TokenizeError::Setup(format!("chat template: {e}")))?;
    Ok(env)
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)`.
fn tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators.as_deref() {
        Some([i, k]) => (i.clone(), k.clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                "separators must be two strings",
            ))
        }
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let v = serde_json::to_value(&value).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    })?;
    let mut out = String::new();
    let fmt = PyJson {
        indent,
        item: &item,
        key: &key,
        sort_keys: sort_keys.unwrap_or(false),
    };
    fmt.write(&mut out, &v, 0);
    Ok(out)
}

/// Python's `json.dumps` layout.
struct PyJson<'a> {
    indent: Option<usize>,
    item: &'a str,
    key: &'a str,
    sort_keys: bool,
}

impl PyJson<'_> {
    fn write(&self, out: &mut String, v: &Value, level: usize) {
        match v {
            Value::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, x) in items.iter().enumerate() {
                    self.separate(out, i, level + 1);
                    self.write(out, x, level + 1);
                }
                self.close(out, level);
                out.push(']');
            }
            Value::Object(map) if !map.is_empty() => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, x)) in entries.into_iter().enumerate() {
                    self.separate(out, i, level + 1);
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push_str(self.key);
                    self.write(out, x, level + 1);
                }
                self.close(out, level);
                out.push('}');
            }
            Value::Number(n) if n.is_f64() => {
                // Python writes whole floats with ".0" and exponents with two
                // digits at least (1e-05).
                let f = n.as_f64().unwrap_or(0.0);
                out.push_str(&py_float(f));
            }
            // Strings (JSON's escapes, non-ASCII kept), integers, booleans,
            // null, empty containers: as serde_json writes them.
            other => out.push_str(&other.to_string()),
        }
    }

    fn separate(&self, out: &mut String, i: usize, level: usize) {
        if i > 0 {
            out.push_str(self.item);
        }
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    }

    fn close(&self, out: &mut String, level: usize) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    }
}

/// Python's `repr` of a float, for the values JSON can hold.
fn py_float(f: f64) -> String {
    if !f.is_finite() {
        return if f.is_nan() {
            "NaN"
        } else if f > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        }
        .into();
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        // Rust's shortest digits, Python's exponent form.
        let s = format!("{f:e}");
        let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

/// Python's `datetime.now().strftime(format)` for the directives chat
/// templates use, in UTC (`%d %b %Y` and the like).
fn strftime(format: &str, now: std::time::SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let u = kvtier_net::clock::Utc::of(now);
    let (year, month, day, h, m, sec) = (u.year, u.month, u.day, u.hour, u.minute, u.second);
    let weekday = u.weekday as usize;
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{:02}", (h + 11) % 12 + 1)),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{sec:02}")),
            Some('j') => out.push_str(&format!("{:03}", u.day_of_year)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}
