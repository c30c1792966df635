//! Route matching: path templates like `/patients/{subject}/records/{record}`
//! compiled once at configure time, matched per request without allocating
//! unless a parameter has to be percent-decoded.

use std::borrow::Cow;

use crate::config::Route;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// A compiled path template: whole segments only, each a literal or `{name}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    segments: Vec<Segment>,
}

/// Parameters extracted by a match, in template order.
pub type Params<'a> = Vec<(&'a str, Cow<'a, str>)>;

impl Template {
    pub fn parse(template: &str) -> Result<Template, String> {
        let Some(rest) = template.strip_prefix('/') else {
            return Err(format!("{template:?} must start with '/'"));
        };
        if template.contains(['?', '#']) {
            return Err(format!("{template:?} must not contain a query or fragment"));
        }
        let mut segments = Vec::new();
        for raw in rest.split('/') {
            if let Some(name) = raw.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
                if name.is_empty() || !name.chars().all(ok) {
                    return Err(format!("parameter {raw:?} must be {{name}} of a-z 0-9 _"));
                }
                if segments
                    .iter()
                    .any(|s| s == &Segment::Param(name.to_owned()))
                {
                    return Err(format!("parameter {name:?} appears twice"));
                }
                segments.push(Segment::Param(name.to_owned()));
            } else if raw.contains(['{', '}']) {
                return Err(format!(
                    "segment {raw:?}: a parameter must be a whole segment"
                ));
            } else if raw.is_empty() && !segments.is_empty() {
                return Err(format!("{template:?} has an empty segment"));
            } else if raw == "." || raw == ".." {
                return Err(format!("{template:?} has a dot segment"));
            } else {
                segments.push(Segment::Literal(raw.to_owned()));
            }
        }
        Ok(Template { segments })
    }

    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(name) => Some(name.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// Matches the path part of `path` (query stripped by the caller).
    /// Parameters are percent-decoded; an empty or undecodable one, or one
    /// that decodes to a dot segment or contains `/`, does not match.
    pub fn matches<'p>(&'p self, path: &'p str) -> Option<Params<'p>> {
        let rest = path.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let mut params = Vec::new();
        for segment in &self.segments {
            let part = parts.next()?;
            match segment {
                Segment::Literal(lit) if lit == part => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) => {
                    let value = percent_decode(part)?;
                    if value.is_empty() || value == "." || value == ".." || value.contains('/') {
                        return None;
                    }
                    params.push((name.as_str(), value));
                }
            }
        }
        parts.next().is_none().then_some(params)
    }
}

/// Decodes `%XX` escapes; `None` for a broken escape or non-UTF-8 result.
pub fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// Splits `:path` into the path and the query string (fragment dropped).
pub fn split_path(full: &str) -> (&str, &str) {
    let full = full.split('#').next().unwrap_or(full);
    match full.split_once('?') {
        Some((path, query)) => (path, query),
        None => (full, ""),
    }
}

/// The first value of `name` in a query string, percent-decoded. `+` stays a
/// plus: identities may contain it, and no consent id contains a space.
pub fn query_param<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| percent_decode(key).is_some_and(|k| k == name))
        .and_then(|(_, value)| percent_decode(value))
}

/// What to do with a request, by its method and path.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    Protected(&'a Route, Params<'a>),
    /// Unmatched, but under a default-deny prefix.
    Undeclared,
    /// Not ours: passes through untouched.
    Pass,
}

/// The protected routes, tried in configuration order: the first match wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTable {
    routes: Vec<Route>,
    default_deny_prefixes: Vec<String>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>, default_deny_prefixes: Vec<String>) -> Self {
        RouteTable {
            routes,
            default_deny_prefixes,
        }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn lookup<'a>(&'a self, method: &str, path: &'a str) -> Lookup<'a> {
        for route in &self.routes {
            if !route.methods.is_empty() && !route.methods.iter().any(|m| m == method) {
                continue;
            }
            if let Some(params) = route.template.matches(path) {
                return Lookup::Protected(route, params);
            }
        }
        if self
            .default_deny_prefixes
            .iter()
            .any(|p| path.starts_with(p.as_str()))
        {
            Lookup::Undeclared
        } else {
            Lookup::Pass
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(template: &str, path: &str) -> Option<Vec<(String, String)>> {
        let t = Template::parse(template).unwrap();
        t.matches(path).map(|p| {
            p.into_iter()
                .map(|(k, v)| (k.to_owned(), v.into_owned()))
                .collect()
        })
    }

    fn pairs(items: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            items
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// A path, and the parameters it should extract (`None`: no match).
    type Case = (&'static str, Option<Vec<(String, String)>>);

    #[test]
    fn templates_match_whole_segments_and_extract_parameters() {
        let t = "/patients/{subject}/records/{record}";
        let cases: &[Case] = &[
            (
                "/patients/p1/records/r9",
                pairs(&[("subject", "p1"), ("record", "r9")]),
            ),
            (
                "/patients/a%40b/records/r",
                pairs(&[("subject", "a@b"), ("record", "r")]),
            ),
            ("/patients/p1/records", None),
            ("/patients/p1/records/r9/", None),
            ("/patients/p1/records/r9/x", None),
            ("/patients//records/r9", None),
            ("/patients/%2E%2E/records/r9", None),
            ("/patients/a%2Fb/records/r9", None),
            ("/patients/%zz/records/r9", None),
            ("/Patients/p1/records/r9", None),
            ("patients/p1/records/r9", None),
        ];
        for (path, expected) in cases {
            assert_eq!(&params(t, path), expected, "{path}");
        }
        assert_eq!(params("/", "/"), pairs(&[]));
        assert_eq!(params("/health", "/health"), pairs(&[]));
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in [
            "patients",
            "/patients/{subject",
            "/patients/x{subject}",
            "/a/{x}/{x}",
            "/a/{X}",
            "/a//b",
            "/a/../b",
            "/a?b=1",
            "/a/{}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn query_and_path_split() {
        assert_eq!(split_path("/a/b?x=1&y=2#f"), ("/a/b", "x=1&y=2"));
        assert_eq!(split_path("/a"), ("/a", ""));
        let q = "patient=p%2B1&other=2&patient=second";
        assert_eq!(query_param(q, "patient").as_deref(), Some("p+1"));
        assert_eq!(query_param("a+b=1", "a+b").as_deref(), Some("1"));
        assert_eq!(query_param("flag", "flag").as_deref(), Some(""));
        assert_eq!(query_param("x=1", "y"), None);
        assert_eq!(query_param("x=%G1", "x"), None);
    }
}
