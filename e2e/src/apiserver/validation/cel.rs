//! `x-kubernetes-validations`: CEL rules compiled with the `cel` crate and
//! evaluated with `self` bound to the value at the rule's node (and `oldSelf`
//! to the stored value on updates), reporting failures as the server does.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use cel::common::functions as types_fn;
use cel::common::types::{self, CelBool, CelOptional, CelString};
use cel::common::value::{CowVal, Val};
use cel::objects::{Key, Map};
use cel::{Context, Env, ExecutionError, Program};
use serde_json::Value as Json;

use super::{Additional, FieldError, FieldErrorKind, Node, Path, Type};

pub(super) struct Rule {
    source: String,
    program: Program,
    message: Option<String>,
    message_expression: Option<Program>,
    /// The rule's `fieldPath` as names (`.a['b.c']` is `a`, `b.c`).
    field_path: Vec<String>,
    reason: Option<FieldErrorKind>,
    /// References `oldSelf`: only evaluated when there is an old value.
    transition: bool,
    optional_old_self: bool,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule")
            .field("rule", &self.source)
            .field("message", &self.message)
            .field("transition", &self.transition)
            .finish_non_exhaustive()
    }
}

/// The environment: the CEL standard library, the extension libraries
/// Kubernetes enables (strings, lists, math) and the Kubernetes libraries
/// reproduced here (regex `find`/`findAll`, list `isSorted`/`sum`/`min`/`max`/
/// `indexOf`/`lastIndexOf`, URLs).
static ENV: LazyLock<Result<Arc<Env>, String>> =
    LazyLock::new(|| build_env().map(Arc::new).map_err(|e| e.to_string()));

fn build_env() -> Result<Env, cel::DeclarationError> {
    let mut env = Env::stdlib();
    env.add_extension(cel::extensions::strings)?;
    env.add_extension(cel::extensions::lists)?;
    env.add_extension(cel::extensions::math)?;
    // `matches` is ours (the crate's `regex` feature is off): it compiles
    // each pattern once instead of on every call. Should the feature come
    // back through feature unification, the built-in one stays.
    let ours = env
        .add_overload(
            "matches",
            "matches_string_string",
            vec![types::STRING_TYPE, types::STRING_TYPE],
            matches,
        )
        .and_then(|()| {
            env.add_member_overload(
                "matches",
                "string_matches_string",
                types::STRING_TYPE,
                vec![types::STRING_TYPE],
                matches,
            )
        });
    match ours {
        Ok(()) | Err(cel::DeclarationError::DuplicateOverload { .. }) => {}
        Err(e) => return Err(e),
    }
    // Kubernetes' regex library.
    env.add_member_overload(
        "find",
        "k8s_string_find",
        types::STRING_TYPE,
        vec![types::STRING_TYPE],
        regex_find,
    )?;
    env.add_member_overload(
        "findAll",
        "k8s_string_find_all",
        types::STRING_TYPE,
        vec![types::STRING_TYPE],
        regex_find_all,
    )?;
    env.add_member_overload(
        "findAll",
        "k8s_string_find_all_n",
        types::STRING_TYPE,
        vec![types::STRING_TYPE, types::INT_TYPE],
        regex_find_all,
    )?;
    // Kubernetes' list library.
    for (name, id, args, op) in [
        (
            "isSorted",
            "k8s_list_is_sorted",
            vec![],
            list_is_sorted as types_fn::Function,
        ),
        ("sum", "k8s_list_sum", vec![], list_sum),
        ("min", "k8s_list_min", vec![], list_min),
        ("max", "k8s_list_max", vec![], list_max),
        (
            "indexOf",
            "k8s_list_index_of",
            vec![types::DYN_TYPE],
            list_index_of,
        ),
        (
            "lastIndexOf",
            "k8s_list_last_index_of",
            vec![types::DYN_TYPE],
            list_last_index_of,
        ),
    ] {
        env.add_member_overload(name, id, types::LIST_TYPE, args, op)?;
    }
    super::url::register(&mut env)?;
    Ok(env)
}

/// Compiled `matches` patterns. Patterns come from CRD rules, so the set is
/// small; the cap only guards against rules that build patterns from data.
static REGEX_CACHE: LazyLock<Mutex<HashMap<String, Arc<regex::Regex>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
const REGEX_CACHE_CAP: usize = 512;

fn cached_regex(pattern: &str) -> Result<Arc<regex::Regex>, regex::Error> {
    let mut cache = REGEX_CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(re) = cache.get(pattern) {
        return Ok(Arc::clone(re));
    }
    let re = Arc::new(super::go_regex(pattern)?);
    if cache.len() >= REGEX_CACHE_CAP {
        cache.clear();
    }
    cache.insert(pattern.to_string(), Arc::clone(&re));
    Ok(re)
}

/// `s.matches(re)` / `matches(s, re)`: RE2 semantics, unanchored.
fn matches<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let [subject, pattern] = args.as_slice() else {
        return Err(ExecutionError::invalid_argument_count(2, args.len()));
    };
    let (Some(subject), Some(pattern)) = (
        subject.downcast_ref::<CelString>(),
        pattern.downcast_ref::<CelString>(),
    ) else {
        return Err(ExecutionError::function_error(
            "matches",
            "arguments must be strings",
        ));
    };
    let re = cached_regex(pattern.inner()).map_err(|e| {
        ExecutionError::function_error(
            "matches",
            format!("'{}' not a valid regex:\n{e}", pattern.inner()),
        )
    })?;
    Ok(CowVal::owned(CelBool::from(re.is_match(subject.inner()))))
}

fn regex_args<'a>(
    args: &'a [CowVal<'_, '_>],
    function: &str,
) -> Result<(&'a str, Arc<regex::Regex>), ExecutionError> {
    let (Some(subject), Some(pattern)) = (
        args.first().and_then(|a| a.downcast_ref::<CelString>()),
        args.get(1).and_then(|a| a.downcast_ref::<CelString>()),
    ) else {
        return Err(ExecutionError::function_error(
            function,
            "arguments must be strings",
        ));
    };
    let re = cached_regex(pattern.inner()).map_err(|e| {
        ExecutionError::function_error(
            function,
            format!("'{}' not a valid regex: {e}", pattern.inner()),
        )
    })?;
    Ok((subject.inner(), re))
}

/// `'abc 123'.find('[0-9]+')`: the first match, or `''`.
fn regex_find<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let (subject, re) = regex_args(&args, "find")?;
    let found = re.find(subject).map_or("", |m| m.as_str());
    owned(cel::Value::String(Arc::new(found.to_string())))
}

/// `'a1 b2'.findAll('[0-9]')`, `'a1 b2'.findAll('[0-9]', 1)`: every match, or
/// at most n (all when n < 0).
fn regex_find_all<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let (subject, re) = regex_args(&args, "findAll")?;
    let limit = match args.get(2) {
        None => usize::MAX,
        Some(n) => match cel::Value::try_from(n.as_ref())? {
            cel::Value::Int(n) if n < 0 => usize::MAX,
            cel::Value::Int(n) => usize::try_from(n).unwrap_or(usize::MAX),
            other => {
                return Err(ExecutionError::function_error(
                    "findAll",
                    format!("limit must be an int, not {}", other.type_of()),
                ));
            }
        },
    };
    let found: Vec<cel::Value> = re
        .find_iter(subject)
        .take(limit)
        .map(|m| cel::Value::String(Arc::new(m.as_str().to_string())))
        .collect();
    owned(cel::Value::List(Arc::new(found)))
}

fn list_of(v: &CowVal<'_, '_>, function: &str) -> Result<Arc<Vec<cel::Value>>, ExecutionError> {
    match cel::Value::try_from(v.as_ref())? {
        cel::Value::List(items) => Ok(items),
        other => Err(ExecutionError::function_error(
            function,
            format!("not a list: {}", other.type_of()),
        )),
    }
}

fn owned<'b, 'v>(v: cel::Value) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let boxed: Box<dyn Val> = v.try_into()?;
    Ok(CowVal::Owned(boxed))
}

fn receiver<'a, 'b, 'v>(
    args: &'a [CowVal<'b, 'v>],
    want: usize,
) -> Result<&'a CowVal<'b, 'v>, ExecutionError> {
    match args.first() {
        Some(r) if args.len() == want => Ok(r),
        _ => Err(ExecutionError::invalid_argument_count(want, args.len())),
    }
}

fn ordered(
    a: &cel::Value,
    b: &cel::Value,
    function: &str,
) -> Result<std::cmp::Ordering, ExecutionError> {
    a.partial_cmp(b).ok_or_else(|| {
        ExecutionError::function_error(
            function,
            format!("cannot compare {} and {}", a.type_of(), b.type_of()),
        )
    })
}

/// `[1, 2, 2].isSorted()`
fn list_is_sorted<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let items = list_of(receiver(&args, 1)?, "isSorted")?;
    for pair in items.windows(2) {
        if ordered(&pair[0], &pair[1], "isSorted")? == std::cmp::Ordering::Greater {
            return owned(cel::Value::Bool(false));
        }
    }
    owned(cel::Value::Bool(true))
}

/// `[1, 2].sum()`; 0 for an empty list.
fn list_sum<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let items = list_of(receiver(&args, 1)?, "sum")?;
    let mut iter = items.iter().cloned();
    let Some(first) = iter.next() else {
        return owned(cel::Value::Int(0));
    };
    let mut total = first;
    for v in iter {
        total = (total + v)?;
    }
    owned(total)
}

fn list_extreme<'b, 'v>(
    args: Vec<CowVal<'b, 'v>>,
    function: &str,
    keep: std::cmp::Ordering,
) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let items = list_of(receiver(&args, 1)?, function)?;
    let mut best: Option<&cel::Value> = None;
    for v in items.iter() {
        best = match best {
            Some(b) if ordered(v, b, function)? != keep => Some(b),
            _ => Some(v),
        };
    }
    match best {
        Some(v) => owned(v.clone()),
        None => Err(ExecutionError::function_error(
            function,
            format!("{function} called on empty list"),
        )),
    }
}

/// `[3, 1].min()`
fn list_min<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    list_extreme(args, "min", std::cmp::Ordering::Less)
}

/// `[3, 1].max()`
fn list_max<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    list_extreme(args, "max", std::cmp::Ordering::Greater)
}

fn list_position<'b, 'v>(
    args: Vec<CowVal<'b, 'v>>,
    function: &str,
    last: bool,
) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let items = list_of(receiver(&args, 2)?, function)?;
    let needle = match args.get(1) {
        Some(n) => cel::Value::try_from(n.as_ref())?,
        None => return Err(ExecutionError::invalid_argument_count(2, args.len())),
    };
    let found = if last {
        items.iter().rposition(|v| *v == needle)
    } else {
        items.iter().position(|v| *v == needle)
    };
    owned(cel::Value::Int(found.map_or(-1, |i| i as i64)))
}

/// `['a', 'b'].indexOf('b')`; -1 when absent.
fn list_index_of<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    list_position(args, "indexOf", false)
}

/// `['a', 'a'].lastIndexOf('a')`; -1 when absent.
fn list_last_index_of<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    list_position(args, "lastIndexOf", true)
}

fn env() -> Result<&'static Arc<Env>, String> {
    ENV.as_ref().map_err(Clone::clone)
}

/// Parses a rule and, like the server's type-checking compile, refuses one
/// that calls a function the environment does not have (the crate would only
/// notice when evaluating it, failing every admission).
fn compile_program(src: &str) -> Result<Program, String> {
    let env = env()?;
    let program = env.compile(src).map_err(|e| e.to_string())?;
    for f in program.references().functions() {
        // Operators (`_+_`, `!_`, `-_`, `@in`, ...) are the interpreter's own.
        if f.starts_with(['_', '!', '-', '@']) || env_has_function(env, f) {
            continue;
        }
        // Namespaced calls (`optional.of(x)`) are referenced by their last part.
        if NAMESPACES
            .iter()
            .any(|ns| env_has_function(env, &format!("{ns}.{f}")))
        {
            continue;
        }
        return Err(format!("undeclared reference to '{f}'"));
    }
    Ok(program)
}

const NAMESPACES: [&str; 4] = ["optional", "math", "strings", "lists"];

/// Whether `name` is declared in the environment: a context refuses a
/// function of its own under a name the environment already declares.
fn env_has_function(env: &Arc<Env>, name: &str) -> bool {
    let mut probe = Context::with_env(Arc::clone(env));
    probe.add_function(name, |x: i64| x).is_err()
}

impl Rule {
    /// Compiles one entry of `x-kubernetes-validations`.
    pub(super) fn compile(v: &Json) -> Result<Rule, String> {
        let source = v
            .get("rule")
            .and_then(Json::as_str)
            .ok_or_else(|| "rule must be a string".to_string())?
            .to_string();
        let program = compile_program(&source)?;
        let message_expression = match v.get("messageExpression").and_then(Json::as_str) {
            Some(src) if !src.trim().is_empty() => {
                Some(compile_program(src).map_err(|e| format!("messageExpression: {e}"))?)
            }
            _ => None,
        };
        let reason = match v.get("reason").and_then(Json::as_str) {
            None | Some("FieldValueInvalid") => None,
            Some("FieldValueForbidden") => Some(FieldErrorKind::Forbidden),
            Some("FieldValueRequired") => Some(FieldErrorKind::Required),
            Some("FieldValueDuplicate") => Some(FieldErrorKind::Duplicate),
            Some(other) => return Err(format!("unsupported reason {other:?}")),
        };
        let field_path = match v.get("fieldPath").and_then(Json::as_str) {
            Some(fp) if !fp.is_empty() => parse_field_path(fp)?,
            _ => Vec::new(),
        };
        let transition = program.references().has_variable("oldSelf");
        Ok(Rule {
            source,
            program,
            message: v
                .get("message")
                .and_then(Json::as_str)
                .map(|m| m.trim().to_string())
                .filter(|m| !m.is_empty()),
            message_expression,
            field_path,
            reason,
            transition,
            optional_old_self: v
                .get("optionalOldSelf")
                .and_then(Json::as_bool)
                .unwrap_or(false),
        })
    }

    /// Whether the rule compares with `oldSelf` (a transition rule).
    pub(super) fn is_transition(&self) -> bool {
        self.transition
    }

    fn rule_error_string(&self) -> String {
        match &self.message {
            Some(m) => m.clone(),
            None => self.source.trim().to_string(),
        }
    }

    /// Evaluates the rule at a node; `None` when it holds (or does not apply).
    pub(super) fn evaluate(
        &self,
        v: &Json,
        old: Option<&Json>,
        s: &Node,
        path: &Path,
        is_resource_root: bool,
    ) -> Option<FieldError> {
        if self.transition && old.is_none() && !self.optional_old_self {
            // Transition rules need a previous value: skipped on create and
            // for values that did not exist before.
            return None;
        }
        let type_name = Json::String(s.type_name().to_string());
        let env = match env() {
            Ok(env) => env,
            Err(e) => {
                return Some(FieldError::new(
                    path.field(),
                    FieldErrorKind::Invalid,
                    Some(type_name),
                    format!("{e} evaluating rule: {}", self.rule_error_string()),
                ));
            }
        };
        let view = |value: &Json| {
            if is_resource_root {
                to_cel(&resource_root_view(value), Some(s))
            } else {
                to_cel(value, Some(s))
            }
        };
        let eval_error = |message: String| {
            Some(FieldError::new(
                path.field(),
                FieldErrorKind::Invalid,
                Some(type_name.clone()),
                format!("{message} evaluating rule: {}", self.rule_error_string()),
            ))
        };
        let mut ctx = Context::with_env(Arc::clone(env));
        match Box::<dyn Val>::try_from(view(v)) {
            Ok(val) => ctx.add_variable_as_val("self", val),
            Err(e) => return eval_error(go_style_error(&e)),
        }
        if self.transition || self.optional_old_self {
            let old_val = old.map(|o| Box::<dyn Val>::try_from(view(o))).transpose();
            match (old_val, self.optional_old_self) {
                (Err(e), _) => return eval_error(go_style_error(&e)),
                (Ok(Some(val)), true) => {
                    ctx.add_variable_as_val("oldSelf", Box::new(CelOptional::from(val)))
                }
                (Ok(None), true) => {
                    ctx.add_variable_as_val("oldSelf", Box::new(CelOptional::none()))
                }
                (Ok(Some(val)), false) => ctx.add_variable_as_val("oldSelf", val),
                (Ok(None), false) => {}
            }
        }
        // The interpreter is third-party code fed with request data: a panic
        // in it must fail this rule, not the API server's request handler.
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.program.execute(&ctx)));
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::warn!(rule = %self.source, "CEL evaluation panicked");
                return eval_error("internal error: CEL evaluation panicked".to_string());
            }
        };
        match outcome {
            Ok(cel::Value::Bool(true)) => None,
            Ok(cel::Value::Bool(false)) => {
                let detail = self.failure_message(&ctx);
                let at = self.error_path(path, s);
                Some(match self.reason {
                    Some(FieldErrorKind::Forbidden) => {
                        FieldError::new(at.field(), FieldErrorKind::Forbidden, None, detail)
                    }
                    Some(FieldErrorKind::Required) => {
                        FieldError::new(at.field(), FieldErrorKind::Required, None, detail)
                    }
                    Some(FieldErrorKind::Duplicate) => FieldError::new(
                        at.field(),
                        FieldErrorKind::Duplicate,
                        Some(type_name),
                        String::new(),
                    ),
                    _ => FieldError::new(
                        at.field(),
                        FieldErrorKind::Invalid,
                        Some(type_name),
                        detail,
                    ),
                })
            }
            Ok(other) => Some(FieldError::new(
                path.field(),
                FieldErrorKind::Invalid,
                Some(type_name),
                format!(
                    "rule returned {}, not a bool, evaluating rule: {}",
                    other.type_of(),
                    self.rule_error_string()
                ),
            )),
            Err(ExecutionError::NoSuchOverload(o)) => Some(FieldError::new(
                path.field(),
                FieldErrorKind::Invalid,
                Some(type_name),
                format!(
                    "'no such overload: {o}': call arguments did not match a supported operator, function or macro signature for rule: {}",
                    self.rule_error_string()
                ),
            )),
            Err(e) => Some(FieldError::new(
                path.field(),
                FieldErrorKind::Invalid,
                Some(type_name),
                format!(
                    "{} evaluating rule: {}",
                    go_style_error(&e),
                    self.rule_error_string()
                ),
            )),
        }
    }

    fn failure_message(&self, ctx: &Context) -> String {
        if let Some(expr) = &self.message_expression
            && let Ok(cel::Value::String(s)) = expr.execute(ctx)
            && !s.trim().is_empty()
            && !s.contains('\n')
        {
            return s.trim().to_string();
        }
        match &self.message {
            Some(m) => m.clone(),
            None => format!("failed rule: {}", self.rule_error_string()),
        }
    }

    /// The node path extended with the rule's `fieldPath`: properties are
    /// children, entries of a map schema are keys (`field.Path` semantics).
    fn error_path(&self, path: &Path, s: &Node) -> Path {
        let mut at = path.clone();
        let mut node = Some(s);
        for name in &self.field_path {
            match node {
                Some(n) if n.properties.contains_key(name) => {
                    at = at.child(name);
                    node = n.properties.get(name);
                }
                Some(Node {
                    additional: Some(Additional::Schema(inner)),
                    ..
                }) => {
                    at = at.key(name);
                    node = Some(inner);
                }
                _ => {
                    at = at.child(name);
                    node = None;
                }
            }
        }
        at
    }
}

/// At a resource's root, rules see only `metadata.name` and
/// `metadata.generateName` of the object's metadata, as on the server.
fn resource_root_view(v: &Json) -> Json {
    let mut out = v.clone();
    if let Some(meta) = out.get_mut("metadata").and_then(Json::as_object_mut) {
        meta.retain(|k, _| k == "name" || k == "generateName");
    }
    out
}

/// Parses `.a.b['c.d']` into names.
fn parse_field_path(fp: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut rest = fp;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let name = &r[..end];
            if name.is_empty() {
                return Err(format!("fieldPath {fp:?}: empty segment"));
            }
            out.push(name.to_string());
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix("['") {
            let end = r
                .find("']")
                .ok_or_else(|| format!("fieldPath {fp:?}: unterminated ['"))?;
            out.push(r[..end].to_string());
            rest = &r[end + 2..];
        } else {
            return Err(format!("fieldPath {fp:?}: expected '.' or \"['\""));
        }
    }
    Ok(out)
}

/// cel-go's wording for the common runtime errors, which the server copies
/// into the field error.
fn go_style_error(e: &ExecutionError) -> String {
    match e {
        ExecutionError::NoSuchKey(k) => format!("no such key: {k}"),
        ExecutionError::DivisionByZero(_) => "division by zero".to_string(),
        ExecutionError::RemainderByZero(_) => "modulus by zero".to_string(),
        ExecutionError::IndexOutOfBounds(i) => format!("index out of bounds: {i:?}"),
        ExecutionError::Overflow(..) => "integer overflow".to_string(),
        other => other.to_string(),
    }
}

/// CEL's reserved words; a property with such a name is `__<name>__`.
const CEL_RESERVED: [&str; 21] = [
    "true",
    "false",
    "null",
    "in",
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
    "while",
];

/// The name a property has in CEL (Kubernetes' escaping): `__` becomes
/// `__underscores__`, `.` `__dot__`, `-` `__dash__`, `/` `__slash__`, a
/// reserved word `__word__`. `None` for a name that cannot be spelled (it
/// starts with a digit or has other characters): rules cannot see it.
fn escape_property(name: &str) -> Option<String> {
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    if CEL_RESERVED.contains(&name) {
        return Some(format!("__{name}__"));
    }
    let mut out = String::with_capacity(name.len());
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '_' if chars.peek() == Some(&'_') => {
                chars.next();
                out.push_str("__underscores__");
            }
            '.' => out.push_str("__dot__"),
            '-' => out.push_str("__dash__"),
            '/' => out.push_str("__slash__"),
            c if c.is_ascii_alphanumeric() || c == '_' => out.push(c),
            _ => return None,
        }
    }
    Some(out)
}

/// JSON to CEL, typed by the schema as the server does: `number` is a double
/// even when written as an integer, `date-time` strings are timestamps,
/// `byte` strings are bytes.
fn to_cel(v: &Json, s: Option<&Node>) -> cel::Value {
    match v {
        Json::Null => cel::Value::Null,
        Json::Bool(b) => cel::Value::Bool(*b),
        Json::Number(n) => {
            let ty = s.and_then(|s| s.ty);
            if ty != Some(Type::Number) {
                if let Some(i) = n.as_i64() {
                    return cel::Value::Int(i);
                }
                if let Some(u) = n.as_u64() {
                    return cel::Value::UInt(u);
                }
            }
            let f = n.as_f64().unwrap_or(f64::NAN);
            if ty == Some(Type::Integer) && f.fract() == 0.0 && f.abs() < 9.2e18 {
                return cel::Value::Int(f as i64);
            }
            cel::Value::Float(f)
        }
        Json::String(st) => {
            match s.and_then(|s| s.format.as_deref()) {
                Some("date-time") | Some("datetime") => {
                    if let Ok(ts) = chrono::DateTime::parse_from_rfc3339(st) {
                        return cel::Value::Timestamp(ts);
                    }
                }
                Some("byte") => {
                    use base64::Engine as _;
                    if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(st) {
                        return cel::Value::Bytes(Arc::new(bytes));
                    }
                }
                _ => {}
            }
            cel::Value::String(Arc::new(st.clone()))
        }
        Json::Array(items) => {
            let is = s.and_then(|s| s.items.as_deref());
            cel::Value::List(Arc::new(items.iter().map(|i| to_cel(i, is)).collect()))
        }
        Json::Object(map) => {
            let m: HashMap<Key, cel::Value> = map
                .iter()
                // A field set to null is absent to CEL: `has()` is false.
                .filter(|(_, val)| !val.is_null())
                .filter_map(|(k, val)| {
                    let child = s.and_then(|s| s.property_schema(k));
                    // Declared properties are struct fields, named as CEL
                    // identifiers; map entries keep their keys.
                    let name = match s {
                        Some(s) if s.properties.contains_key(k) => escape_property(k)?,
                        _ => k.clone(),
                    };
                    Some((Key::String(Arc::new(name)), to_cel(val, child)))
                })
                .collect();
            cel::Value::Map(Map { map: Arc::new(m) })
        }
    }
}
