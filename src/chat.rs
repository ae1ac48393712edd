//! Chat templates: a conversation rendered into the prompt text a model was trained on.
//!
//! Built in: ChatML, Llama 2, Alpaca, Zephyr (TinyLlama's), Llama 3. A GGUF file's own
//! `tokenizer.chat_template` (Jinja) is the default when the file has one; it renders as
//! Hugging Face transformers' `apply_chat_template` renders it with jinja2 (reference:
//! transformers' `utils/chat_template_utils.py`):
//! - `trim_blocks` and `lstrip_blocks` on, the trailing newline dropped;
//! - Python's string, list and dict methods (`.strip()`, `.startswith()`, `.items()`...,
//!   from minijinja-contrib's pycompat), macros, `{% break %}` / `{% continue %}`;
//! - values printed as Python's `str()` prints them (`None`, `True`, `['a', 1.0]`);
//! - `tojson` as Python's `json.dumps(x, ensure_ascii=False)`, with its `indent`,
//!   `separators` and `sort_keys` arguments;
//! - the globals `raise_exception(message)` and `strftime_now(format)` (the local time, or
//!   the instant `SOURCE_DATE_EPOCH` gives, in UTC, for reproducible renders);
//! - the `{% generation %}...{% endgeneration %}` block (transformers' assistant tracker),
//!   which renders its body;
//! - the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and
//!   `tools` and `documents` (none when absent, as transformers passes them).
//!
//! Every template renders `add_generation_prompt` the same way: the opening of the
//! assistant's turn, so generation continues as the reply.

use std::fmt::Write as _;

use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value, ValueKind};
use minijinja::{Environment, ErrorKind};

use crate::tokenizer::Tokenizer;

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`, or any role a template knows.
    pub role: String,
    /// The text; `None` for a message without one (a message that only carries tool calls):
    /// templates then see no `content` field at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Any further fields (`tool_calls`, `name`, `tool_call_id`...), passed to a Jinja
    /// template as they are, in their order.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: Some(content.into()),
            extra: serde_json::Map::new(),
        }
    }

    /// The text, or "" for none.
    pub fn text(&self) -> &str {
        self.content.as_deref().unwrap_or("")
    }
}

/// What a template renders besides the messages.
#[derive(Clone, Copy, Debug, Default)]
pub struct RenderOptions<'a> {
    /// End with the opening of the assistant's turn.
    pub add_generation_prompt: bool,
    /// The model's BOS and EOS tokens as text (`bos_token`, `eos_token` in Jinja).
    pub bos_token: &'a str,
    pub eos_token: &'a str,
    /// Tool descriptions (JSON schemas) for templates that take them (`tools`).
    pub tools: Option<&'a [serde_json::Value]>,
    /// Documents for retrieval-augmented templates (`documents`).
    pub documents: Option<&'a [serde_json::Value]>,
}

/// A template that cannot be made or cannot render.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error(
        "unknown template '{0}': expected chatml, llama2, alpaca, zephyr, llama3, plain or model"
    )]
    Unknown(String),
    /// A Jinja template failed to parse or to render: where, and what.
    #[error("chat template, line {line}: {message}{}", at(construct))]
    Jinja {
        /// 1-based line of the template's source (0 when unknown).
        line: usize,
        /// The failing construct as written in the source (empty when unknown).
        construct: String,
        message: String,
    },
}

fn at(construct: &str) -> String {
    if construct.is_empty() {
        String::new()
    } else {
        format!(" (at `{construct}`)")
    }
}

/// A chat template.
#[derive(Clone, Debug)]
pub enum Template {
    /// `<|im_start|>role\n...<|im_end|>\n`.
    ChatMl,
    /// `{bos}[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST] reply {eos}`.
    Llama2,
    /// `### Instruction:` / `### Response:`.
    Alpaca,
    /// `<|system|>\n...{eos}\n<|user|>\n...{eos}\n<|assistant|>\n` (Zephyr, TinyLlama chat).
    Zephyr,
    /// `{bos}<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>`.
    Llama3,
    /// No template: each message's text on a line of its own, so that the model continues
    /// the text. What `chord chat` uses for a base model, one whose file has no
    /// `tokenizer.chat_template` (Gemma 3 270M), rather than markers of another model's
    /// training that it has never seen. A chat reply in it ends at the end of its line.
    Plain,
    /// A Jinja template, as `tokenizer.chat_template` holds one, compiled.
    Jinja(Box<JinjaTemplate>),
}

/// A compiled Jinja chat template and its environment.
#[derive(Clone, Debug)]
pub struct JinjaTemplate {
    env: Environment<'static>,
    source: String,
}

/// Instructions one render may run: a chat template over a long conversation takes tens of
/// thousands; a template that loops without end stops here with an error.
const FUEL: u64 = 2_000_000;
/// Deepest nesting of lists and dicts printed or turned into JSON (Python stops near 1000).
const MAX_DEPTH: usize = 512;
const NAME: &str = "chat_template";

impl Template {
    /// The built-in template named `name`: `chatml`, `llama2`, `alpaca`, `zephyr`, `llama3`,
    /// `plain`.
    pub fn named(name: &str) -> Result<Template, TemplateError> {
        Ok(match name {
            "chatml" => Template::ChatMl,
            "llama2" => Template::Llama2,
            "alpaca" => Template::Alpaca,
            "zephyr" => Template::Zephyr,
            "llama3" => Template::Llama3,
            "plain" => Template::Plain,
            _ => return Err(TemplateError::Unknown(name.into())),
        })
    }

    /// Compiles a Jinja template; a syntax error names its line.
    pub fn jinja(source: &str) -> Result<Template, TemplateError> {
        let mut env = environment();
        let compiled = compiled_source(source);
        env.add_template_owned(NAME, compiled.clone())
            .map_err(|e| jinja_error(&e, &compiled))?;
        Ok(Template::Jinja(Box::new(JinjaTemplate {
            env,
            source: compiled,
        })))
    }

    /// Renders `messages` with `opts`; with `add_generation_prompt`, ends with the opening of
    /// the assistant's turn.
    pub fn render(
        &self,
        messages: &[Message],
        opts: &RenderOptions,
    ) -> Result<String, TemplateError> {
        let json: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| serde_json::to_value(m).expect("a message serialises"))
            .collect();
        self.render_json(&json, opts)
    }

    /// Renders messages given as JSON objects, passed to a Jinja template as they are (any
    /// fields, in their order, `content` a string, a list of parts or absent), as
    /// transformers passes them. The built-in templates read `role` and a string `content`.
    pub fn render_json(
        &self,
        messages: &[serde_json::Value],
        opts: &RenderOptions,
    ) -> Result<String, TemplateError> {
        if let Template::Jinja(t) = self {
            return t.render(messages, opts);
        }
        let field = |m: &serde_json::Value, k: &str| {
            m.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string()
        };
        let turns: Vec<(String, String)> = messages
            .iter()
            .map(|m| (field(m, "role"), field(m, "content")))
            .collect();
        let (bos, eos) = (opts.bos_token, opts.eos_token);
        let mut out = String::new();
        let generation = opts.add_generation_prompt;
        match self {
            Template::ChatMl => {
                for (role, text) in &turns {
                    out += &format!("<|im_start|>{role}\n{text}<|im_end|>\n");
                }
                if generation {
                    out += "<|im_start|>assistant\n";
                }
            }
            Template::Llama2 => {
                // The system prompt folds into the first user turn.
                let mut system: Option<&str> = None;
                for (role, text) in &turns {
                    match role.as_str() {
                        "system" => system = Some(text),
                        "user" => {
                            out += &format!("{bos}[INST] ");
                            if let Some(s) = system.take() {
                                out += &format!("<<SYS>>\n{s}\n<</SYS>>\n\n");
                            }
                            out += &format!("{text} [/INST]");
                        }
                        _ => out += &format!(" {text} {eos}"),
                    }
                }
            }
            Template::Alpaca => {
                for (role, text) in &turns {
                    match role.as_str() {
                        "system" => out += &format!("{text}\n\n"),
                        "user" => out += &format!("### Instruction:\n{text}\n\n"),
                        _ => out += &format!("### Response:\n{text}\n\n"),
                    }
                }
                if generation {
                    out += "### Response:\n";
                }
            }
            Template::Zephyr => {
                for (role, text) in &turns {
                    out += &format!("<|{role}|>\n{text}{eos}\n");
                }
                if generation {
                    out += "<|assistant|>\n";
                }
            }
            Template::Llama3 => {
                out += bos;
                for (role, text) in &turns {
                    out +=
                        &format!("<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>");
                }
                if generation {
                    out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
                }
            }
            Template::Plain => {
                for (_, text) in &turns {
                    out += &format!("{text}\n");
                }
            }
            Template::Jinja(_) => unreachable!("rendered above"),
        }
        Ok(out)
    }
}

/// Stack of the thread a Jinja template renders on: deep nesting (a template may build
/// lists of lists in a loop, up to what the fuel allows) recurses in the renderer. Address
/// space only; pages are touched as deep as a render goes.
const RENDER_STACK: usize = 256 << 20;

impl JinjaTemplate {
    /// Renders on a thread of its own with a large stack (see [`RENDER_STACK`]).
    fn render(
        &self,
        messages: &[serde_json::Value],
        opts: &RenderOptions,
    ) -> Result<String, TemplateError> {
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("chord-template".into())
                .stack_size(RENDER_STACK)
                .spawn_scoped(scope, || self.render_here(messages, opts))
                .map_err(|e| TemplateError::Jinja {
                    line: 0,
                    construct: String::new(),
                    message: format!("cannot start the rendering thread: {e}"),
                })?
                .join()
                .unwrap_or_else(|_| {
                    Err(TemplateError::Jinja {
                        line: 0,
                        construct: String::new(),
                        message: "the template renderer failed".into(),
                    })
                })
        })
    }

    fn render_here(
        &self,
        messages: &[serde_json::Value],
        opts: &RenderOptions,
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template(NAME).expect("added when compiled");
        let json = |v: Option<&[serde_json::Value]>| {
            v.map_or(Value::from(()), |items| {
                Value::from_object(PyList(items.iter().map(python_value).collect()))
            })
        };
        let ctx = minijinja::context! {
            messages => Value::from_object(PyList(messages.iter().map(python_value).collect())),
            add_generation_prompt => opts.add_generation_prompt,
            bos_token => opts.bos_token,
            eos_token => opts.eos_token,
            tools => json(opts.tools),
            documents => json(opts.documents),
        };
        template
            .render(ctx)
            .map_err(|e| jinja_error(&e, &self.source))
    }
}

/// The environment transformers renders chat templates in (see the module docs).
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_debug(true); // errors keep the failing construct's place in the source
    env.set_fuel(Some(FUEL));
    env.set_unknown_method_callback(python_methods);
    env.set_formatter(|out, _state, value| {
        let text = if value.kind() == ValueKind::String {
            value.as_str().unwrap_or_default().to_string()
        } else {
            python_str(value)
        };
        out.write_str(&text)
            .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "cannot write"))
    });
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", |message: String| -> Result<Value, _> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
    });
    env.add_function("strftime_now", strftime_now);
    env
}

/// Python's methods on template values: minijinja-contrib's pycompat, and the ones it lacks
/// that chat templates use (`rsplit`, `partition`, `zfill`, `swapcase`, `index`...).
fn python_methods(
    state: &minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, minijinja::Error> {
    let bad = |m: String| minijinja::Error::new(ErrorKind::InvalidOperation, m);
    if let Some(s) = value.as_str() {
        let arg_str = |i: usize| args.get(i).and_then(|a| a.as_str()).map(str::to_string);
        match method {
            "rsplit" => {
                let max = args
                    .get(1)
                    .and_then(|a| i64::try_from(a.clone()).ok())
                    .unwrap_or(-1);
                let parts: Vec<String> = match arg_str(0) {
                    Some(sep) if !sep.is_empty() => {
                        let mut v: Vec<String> = if max < 0 {
                            s.rsplit(sep.as_str()).map(str::to_string).collect()
                        } else {
                            s.rsplitn(max as usize + 1, sep.as_str())
                                .map(str::to_string)
                                .collect()
                        };
                        v.reverse();
                        v
                    }
                    Some(_) => return Err(bad("rsplit: empty separator".into())),
                    None => s.split_whitespace().map(str::to_string).collect(),
                };
                return Ok(Value::from(parts));
            }
            "partition" | "rpartition" => {
                let sep = arg_str(0).ok_or_else(|| bad(format!("{method}: a separator")))?;
                let found = if method == "partition" {
                    s.find(&sep)
                } else {
                    s.rfind(&sep)
                };
                let parts = match found {
                    Some(at) => vec![&s[..at], &sep[..], &s[at + sep.len()..]],
                    None if method == "partition" => vec![s, "", ""],
                    None => vec!["", "", s],
                };
                return Ok(Value::from(
                    parts.into_iter().map(str::to_string).collect::<Vec<_>>(),
                ));
            }
            "swapcase" => {
                return Ok(Value::from(
                    s.chars()
                        .flat_map(|c| {
                            if c.is_uppercase() {
                                c.to_lowercase().collect::<Vec<_>>()
                            } else {
                                c.to_uppercase().collect()
                            }
                        })
                        .collect::<String>(),
                ));
            }
            "casefold" => return Ok(Value::from(s.to_lowercase())),
            "zfill" => {
                let width = args
                    .first()
                    .and_then(|a| usize::try_from(a.clone()).ok())
                    .unwrap_or(0);
                let n = s.chars().count();
                if n >= width {
                    return Ok(Value::from(s));
                }
                let (sign, rest) = match s.chars().next() {
                    Some(c @ ('+' | '-')) => (c.to_string(), &s[1..]),
                    _ => (String::new(), s),
                };
                return Ok(Value::from(format!(
                    "{sign}{}{rest}",
                    "0".repeat(width - n)
                )));
            }
            "index" | "rindex" => {
                let sub = arg_str(0).ok_or_else(|| bad(format!("{method}: a substring")))?;
                let at = if method == "index" {
                    s.find(&sub)
                } else {
                    s.rfind(&sub)
                };
                return match at {
                    Some(b) => Ok(Value::from(s[..b].chars().count())),
                    None => Err(bad("substring not found".into())),
                };
            }
            _ => {}
        }
    } else if value.kind() == ValueKind::Seq && matches!(method, "index" | "count") {
        let needle = args
            .first()
            .ok_or_else(|| bad(format!("{method}: a value")))?;
        let items: Vec<Value> = value.try_iter()?.collect();
        return match method {
            "count" => Ok(Value::from(items.iter().filter(|v| *v == needle).count())),
            _ => items
                .iter()
                .position(|v| v == needle)
                .map(Value::from)
                .ok_or_else(|| bad("value is not in the list".into())),
        };
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// The source as minijinja compiles it: line ends normalised to `\n` (jinja2 does so), and,
/// since minijinja has no custom tags, `{% generation %}` and `{% endgeneration %}` (with
/// any whitespace control) made `{% if true %}` and `{% endif %}` with the same markers,
/// which render the body and trim the same whitespace. The tags are padded to their
/// original length, so that error positions still point into the original source; a tag
/// written inside a `{{ ... }}` expression (a string literal) is left alone.
fn compiled_source(source: &str) -> String {
    use std::sync::LazyLock;
    static TAG: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"\{%([-+]?)\s*(end)?generation\s*([-+]?)%\}")
            .expect("a valid expression")
    });
    let source = source.replace("\r\n", "\n").replace('\r', "\n");
    let inside_expression = |at: usize| {
        let before = &source[..at];
        matches!((before.rfind("{{"), before.rfind("}}")), (Some(open), close) if close.is_none_or(|c| c < open))
    };
    TAG.replace_all(&source, |c: &regex::Captures| {
        let whole = c.get(0).expect("the match");
        if inside_expression(whole.start()) {
            return whole.as_str().to_string();
        }
        let body = if c.get(2).is_some() {
            "endif"
        } else {
            "if true"
        };
        let tag = format!("{{%{} {body} {}%}}", &c[1], &c[3]);
        let pad = whole.len().saturating_sub(tag.len());
        format!("{{%{} {body} {}{}%}}", &c[1], " ".repeat(pad), &c[3])
    })
    .into_owned()
}

fn jinja_error(e: &minijinja::Error, source: &str) -> TemplateError {
    let line = e.line().unwrap_or(0);
    let construct = e
        .range()
        .and_then(|r| source.get(r))
        .map(|s| s.to_string())
        .or_else(|| {
            let l = source.lines().nth(line.checked_sub(1)?)?.trim();
            Some(l.chars().take(120).collect())
        })
        .unwrap_or_default();
    let message = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) => d.to_string(),
        (kind, Some(d)) => format!("{kind}: {d}"),
        (kind, None) => kind.to_string(),
    };
    TemplateError::Jinja {
        line,
        construct,
        message,
    }
}

/// `strftime_now(format)`: now, formatted with Python's `strftime` directives; now is the
/// local time, or `SOURCE_DATE_EPOCH` (seconds since 1970, UTC) when that is set.
fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    let bad = |what: String| minijinja::Error::new(ErrorKind::InvalidOperation, what);
    let mut out = String::new();
    let written = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(epoch) => {
            let secs: i64 = epoch
                .trim()
                .parse()
                .map_err(|_| bad(format!("SOURCE_DATE_EPOCH={epoch:?} is not whole seconds")))?;
            let t = chrono::DateTime::from_timestamp(secs, 0)
                .ok_or_else(|| bad(format!("SOURCE_DATE_EPOCH={secs} is out of range")))?;
            write!(out, "{}", t.format(&format))
        }
        Err(_) => write!(out, "{}", chrono::Local::now().format(&format)),
    };
    written.map_err(|_| bad(format!("strftime_now: bad format {format:?}")))?;
    Ok(out)
}

/// JSON data as template values that print as Python prints lists and dicts (`['a', 1]`,
/// `{'k': None}`), also where jinja2 turns them into strings (`~`, `|string`).
fn python_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Array(a) => {
            Value::from_object(PyList(a.iter().map(python_value).collect()))
        }
        serde_json::Value::Object(m) => Value::from_object(PyDict(
            m.iter()
                .map(|(k, v)| (k.clone(), python_value(v)))
                .collect(),
        )),
        other => Value::from_serialize(other),
    }
}

/// A Python list.
#[derive(Debug)]
struct PyList(Vec<Value>);

impl Object for PyList {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0.get(key.as_usize()?).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Seq(self.0.len())
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&python_str(&Value::from_dyn_object(self.clone())))
    }
}

/// A Python dict, in insertion order.
#[derive(Debug)]
struct PyDict(indexmap::IndexMap<String, Value>);

impl Object for PyDict {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0.get(key.as_str()?).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.keys().map(|k| Value::from(k.as_str())).collect())
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&python_str(&Value::from_dyn_object(self.clone())))
    }
}

/// Python's `repr(float)`: the shortest digits that read back, positional when the decimal
/// exponent is in [-4, 16), else `1.5e-07` / `1e+20`.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    let sci = format!("{x:e}"); // shortest round-trip digits: "-1.5e-7"
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits = mantissa.replace('.', "");
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            let zeros = "0".repeat(point as usize - digits.len());
            format!("{sign}{digits}{zeros}.0")
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let m = if digits.len() == 1 {
            digits
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        let s = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{s}{:02}", exp.abs())
    }
}

/// Python's `repr(str)`: single quotes unless the text holds a single quote and no double
/// one; backslash, the quote and control characters escaped.
fn python_repr_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// A value as Python's `str()` prints it (strings inside containers as `repr`).
fn python_str(v: &Value) -> String {
    python_text(v, 0)
}

/// `v` as `str()` prints it at nesting `depth` (0: the value itself; deeper: inside a list or
/// dict, where strings print as `repr`). Past [`MAX_DEPTH`] a container prints as `[...]`.
fn python_text(v: &Value, depth: usize) -> String {
    let nested = depth > 0;
    if depth > MAX_DEPTH && matches!(v.kind(), ValueKind::Seq | ValueKind::Map) {
        return "[...]".into();
    }
    match v.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => if v.is_true() { "True" } else { "False" }.into(),
        ValueKind::Number if v.is_integer() => v.to_string(),
        ValueKind::Number => python_float(f64::try_from(v.clone()).unwrap_or(f64::NAN)),
        ValueKind::String if nested => python_repr_str(v.as_str().unwrap_or_default()),
        ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        ValueKind::Seq => {
            let items: Vec<String> = v
                .try_iter()
                .map(|it| it.map(|x| python_text(&x, depth + 1)).collect())
                .unwrap_or_default();
            format!("[{}]", items.join(", "))
        }
        ValueKind::Map => {
            let items: Vec<String> = v
                .try_iter()
                .map(|keys| {
                    keys.map(|k| {
                        let value = v.get_item(&k).unwrap_or_default();
                        format!(
                            "{}: {}",
                            python_text(&k, depth + 1),
                            python_text(&value, depth + 1)
                        )
                    })
                    .collect()
                })
                .unwrap_or_default();
            format!("{{{}}}", items.join(", "))
        }
        _ => v.to_string(),
    }
}

/// The `tojson` filter as transformers defines it: `json.dumps(x, ensure_ascii=False,
/// indent=indent, separators=separators, sort_keys=sort_keys)`. Separators default to
/// `", "` and `": "`, or `","` and `": "` with an indent; floats print as Python's `repr`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.is_integer() => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
        Some(v) => Some(v.as_str().unwrap_or_default().to_string()),
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let pair: Vec<Value> = s.try_iter()?.collect();
            match pair.as_slice() {
                [a, b] => (a.to_string(), b.to_string()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair",
                    ));
                }
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    fn write(&self, v: &Value, depth: usize, out: &mut String) -> Result<(), minijinja::Error> {
        if depth > MAX_DEPTH {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: nested deeper than {MAX_DEPTH}"),
            ));
        }
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
            ValueKind::Number => {
                let x = f64::try_from(v.clone())?;
                out.push_str(&if x.is_nan() {
                    "NaN".into()
                } else if x.is_infinite() {
                    if x > 0.0 { "Infinity" } else { "-Infinity" }.into()
                } else {
                    python_float(x)
                });
            }
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container(out, depth, '[', ']', &items, |item, out| {
                    self.write(item, depth + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.container(out, depth, '{', '}', &keys, |k, out| {
                    match k.kind() {
                        ValueKind::String => self.string(k.as_str().unwrap_or_default(), out),
                        ValueKind::None => out.push_str("\"null\""),
                        _ => {
                            let mut key = String::new();
                            self.write(k, depth + 1, &mut key)?;
                            self.string(&key, out);
                        }
                    }
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(k)?, depth + 1, out)
                })?;
            }
            kind => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a value of type {kind} is not JSON serializable"),
                ));
            }
        }
        Ok(())
    }

    /// `[a, b]` or, with an indent, one item per line.
    fn container<T>(
        &self,
        out: &mut String,
        depth: usize,
        open: char,
        close: char,
        items: &[T],
        mut each: impl FnMut(&T, &mut String) -> Result<(), minijinja::Error>,
    ) -> Result<(), minijinja::Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        let newline = |out: &mut String, level: usize| {
            if let Some(ind) = &self.indent {
                out.push('\n');
                out.push_str(&ind.repeat(level));
            }
        };
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            newline(out, depth + 1);
            each(item, out)?;
        }
        newline(out, depth);
        out.push(close);
        Ok(())
    }

    /// A JSON string as Python writes it: `"`, `\` and control characters escaped.
    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{u:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A conversation with a model: its history, rendered through a template each turn, and the
/// tokens already in the KV cache, so each turn feeds only what is new.
pub struct Session {
    pub messages: Vec<Message>,
    template: Template,
    bos: String,
    eos: String,
    /// Tokens whose keys and values the state holds, in order.
    cached: Vec<u32>,
}

impl Session {
    /// An empty conversation rendered with `template`; `bos`, `eos`: the model's tokens as text.
    pub fn new(template: Template, bos: &str, eos: &str) -> Session {
        Session {
            messages: Vec::new(),
            template,
            bos: bos.into(),
            eos: eos.into(),
            cached: Vec::new(),
        }
    }

    /// Sets (or replaces) the system prompt, first in the conversation.
    pub fn set_system(&mut self, text: &str) {
        self.messages.retain(|m| m.role != "system");
        self.messages.insert(0, Message::new("system", text));
    }

    /// Forgets every turn but the system prompt.
    pub fn clear(&mut self) {
        self.messages.retain(|m| m.role == "system");
    }

    /// Adds a turn without generating (`user` or `assistant`).
    pub fn push(&mut self, role: &str, content: &str) {
        self.messages.push(Message::new(role, content));
    }

    /// The conversation so far rendered with the generation prompt.
    pub fn render(&self) -> Result<String, TemplateError> {
        self.template.render(
            &self.messages,
            &RenderOptions {
                add_generation_prompt: true,
                bos_token: &self.bos,
                eos_token: &self.eos,
                ..Default::default()
            },
        )
    }

    /// The prompt for the assistant's next turn, tokenized, leaving `reserve` tokens for the
    /// reply within `ctx`: the oldest turns (after the system prompt) are dropped until it
    /// fits. Returns the ids and how many turns were dropped.
    pub fn prompt(
        &mut self,
        tok: &Tokenizer,
        ctx: usize,
        reserve: usize,
    ) -> Result<(Vec<u32>, usize), String> {
        let mut dropped = 0;
        loop {
            let text = self.render().map_err(|e| e.to_string())?;
            let ids = tok.encode(&text, true);
            if ids.len() + reserve <= ctx {
                return Ok((ids, dropped));
            }
            // The oldest turn that is not the system prompt, unless it is the last one.
            let oldest = self.messages.iter().position(|m| m.role != "system");
            match oldest {
                Some(i) if i + 1 < self.messages.len() => {
                    self.messages.remove(i);
                    dropped += 1;
                }
                _ => {
                    return Err(format!(
                        "the message alone ({} tokens) and the reply ({reserve}) do not fit the {ctx}-token context",
                        ids.len()
                    ));
                }
            }
        }
    }

    /// Generates the assistant's reply to the conversation, streaming it to `on_token`
    /// (returning `false` stops the reply), and adds it to the history. `reserve` tokens are
    /// kept free for it; the context is `state`'s.
    pub fn reply<B: crate::backend::Backend>(
        &mut self,
        model: &crate::model::Model<'_, B>,
        state: &mut crate::model::State,
        tok: &Tokenizer,
        sampler: &mut crate::sample::Sampler,
        reserve: usize,
        on_token: impl FnMut(u32, &str) -> bool,
    ) -> Result<(crate::generate::Generation, usize), String> {
        let (ids, dropped) = self.prompt(tok, state.max_seq(), reserve)?;
        // Reuse the cached prefix; at least the last prompt token runs again.
        let common = self
            .cached
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len() - 1);
        state.pos = common;
        // Plain continuation has no end-of-turn token: a message is a line, so the reply
        // ends where its line does.
        let line_end = ["\n".to_string()];
        let req = crate::generate::Request {
            prompt_ids: &ids[common..],
            max_new: reserve,
            ignore_eos: false,
            stop: match self.template {
                Template::Plain => &line_end,
                _ => &[],
            },
        };
        let result = crate::generate::generate(model, state, tok, sampler, req, on_token);
        let g = match result {
            Ok(g) => g,
            Err(e) => {
                self.cached.clear();
                state.reset();
                return Err(e.to_string());
            }
        };
        // The state now holds the prompt and every generated token but the last.
        self.cached = ids;
        self.cached
            .extend_from_slice(&g.generated_ids[..g.generated_ids.len().saturating_sub(1)]);
        self.messages.push(Message::new("assistant", &g.text));
        Ok((g, dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_repr() {
        for (x, want) in [
            (1.0, "1.0"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1e-7, "1e-07"),
            (1e20, "1e+20"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.0 / 3.0, "0.3333333333333333"),
            (-2.5e-300, "-2.5e-300"),
            (123456.789, "123456.789"),
        ] {
            assert_eq!(python_float(x), want, "{x}");
        }
    }

    #[test]
    fn strings_repr_as_python_does() {
        assert_eq!(python_repr_str("a"), "'a'");
        assert_eq!(python_repr_str("it's"), "\"it's\"");
        assert_eq!(python_repr_str("say \"hi\" it's"), "'say \"hi\" it\\'s'");
        assert_eq!(python_repr_str("a\\b\n\t\u{1}"), "'a\\\\b\\n\\t\\x01'");
    }

    #[test]
    fn generation_tags_keep_their_whitespace_markers_and_their_length() {
        let src = "{%- generation %}x{% endgeneration -%}";
        let out = compiled_source(src);
        assert_eq!(out, "{%- if true    %}x{% endif         -%}");
        assert_eq!(out.len(), src.len());
        // In an expression (a string literal), not a tag.
        let literal = "{{ '{% generation %}' }}";
        assert_eq!(compiled_source(literal), literal);
        assert_eq!(compiled_source("a\r\nb\rc"), "a\nb\nc");
    }
}
