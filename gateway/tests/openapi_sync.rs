//! Keeps `openapi.yaml` (the HTTP contract) and the router in step: the same
//! (method, path) pairs, every `$ref` resolving, and every operation with
//! responses and (outside the operations routes) security.

use std::collections::BTreeSet;

use serde_yaml_ng::{Mapping, Value};

const SPEC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi.yaml");

/// The HTTP methods an OpenAPI path item may hold operations under.
const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// Routes that are public by design (probes and scrapers carry no API key; the
/// playground and training pages ask for a key in the browser and send it with each call).
const PUBLIC_PATHS: [&str; 5] = ["/healthz", "/readyz", "/metrics", "/playground", "/admin/training"];

fn spec() -> Value {
    let text = std::fs::read_to_string(SPEC_PATH).unwrap_or_else(|e| panic!("reading {SPEC_PATH}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("parsing {SPEC_PATH}: {e}"))
}

fn mapping<'a>(value: &'a Value, what: &str) -> &'a Mapping {
    value.as_mapping().unwrap_or_else(|| panic!("{what} is not a mapping"))
}

fn key_str<'a>(key: &'a Value, what: &str) -> &'a str {
    key.as_str().unwrap_or_else(|| panic!("a key of {what} is not a string: {key:?}"))
}

/// Every operation in the spec: (method, path, operation object).
fn operations(spec: &Value) -> Vec<(String, String, &Value)> {
    let paths = mapping(spec.get("paths").expect("openapi.yaml has no `paths`"), "paths");
    let mut out = Vec::new();
    for (path, item) in paths {
        let path = key_str(path, "paths");
        for (method, operation) in mapping(item, path) {
            let method = key_str(method, path);
            if METHODS.contains(&method) {
                out.push((method.to_string(), path.to_string(), operation));
            }
        }
    }
    out
}

#[test]
fn paths_match_the_router() {
    let spec = spec();
    let documented: BTreeSet<(String, String)> =
        operations(&spec).into_iter().map(|(method, path, _)| (method, path)).collect();
    let served: BTreeSet<(String, String)> =
        gateway::route_list().into_iter().map(|(method, path)| (method.to_string(), path.to_string())).collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let not_served: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && not_served.is_empty(),
        "openapi.yaml and gateway::route_list() differ.\n  served but not in openapi.yaml: {undocumented:?}\n  in \
         openapi.yaml but not served: {not_served:?}"
    );
}

/// Collects every `$ref` string in `value`, with where it was found.
fn collect_refs(value: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match value {
        Value::Mapping(map) => {
            for (key, child) in map {
                let key = match key {
                    Value::String(s) => s.clone(),
                    other => format!("{other:?}"),
                };
                if key == "$ref" {
                    match child.as_str() {
                        Some(target) => out.push((target.to_string(), at.to_string())),
                        None => out.push((format!("{child:?}"), at.to_string())),
                    }
                } else {
                    collect_refs(child, &format!("{at}/{key}"), out);
                }
            }
        }
        Value::Sequence(items) => {
            for (i, child) in items.iter().enumerate() {
                collect_refs(child, &format!("{at}/{i}"), out);
            }
        }
        Value::Tagged(tagged) => collect_refs(&tagged.value, at, out),
        _ => {}
    }
}

/// Follows a JSON pointer (`#/components/schemas/Error`) through the spec.
fn resolve<'a>(spec: &'a Value, pointer: &str) -> Option<&'a Value> {
    let mut node = spec;
    for segment in pointer.strip_prefix("#/")?.split('/') {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        node = match node {
            Value::Mapping(map) => map.get(segment.as_str())?,
            Value::Sequence(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(node)
}

#[test]
fn every_ref_resolves() {
    let spec = spec();
    let mut refs = Vec::new();
    collect_refs(&spec, "#", &mut refs);
    assert!(!refs.is_empty(), "openapi.yaml has no $ref at all");
    let broken: Vec<String> = refs
        .iter()
        .filter(|(target, _)| !target.starts_with("#/components/") || resolve(&spec, target).is_none())
        .map(|(target, at)| format!("{target} (at {at})"))
        .collect();
    assert!(broken.is_empty(), "$refs that do not resolve to an existing component:\n  {}", broken.join("\n  "));
}

#[test]
fn every_operation_has_responses_and_security() {
    let spec = spec();
    let root_security = spec.get("security");
    let schemes: BTreeSet<&str> = spec
        .get("components")
        .and_then(|c| c.get("securitySchemes"))
        .and_then(Value::as_mapping)
        .map(|m| m.keys().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut problems = Vec::new();
    for (method, path, operation) in operations(&spec) {
        let name = format!("{} {path}", method.to_uppercase());
        let responses = operation.get("responses").and_then(Value::as_mapping);
        if responses.is_none_or(Mapping::is_empty) {
            problems.push(format!("{name}: declares no responses"));
        }
        if PUBLIC_PATHS.contains(&path.as_str()) {
            continue;
        }
        // Operation-level security overrides the root's; an empty list means public.
        let requirements = operation.get("security").or(root_security).and_then(Value::as_sequence);
        match requirements {
            Some(list) if !list.is_empty() => {
                for requirement in list {
                    let names: Vec<&str> = requirement
                        .as_mapping()
                        .map(|m| m.keys().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    if names.is_empty() {
                        problems.push(format!("{name}: has an empty security requirement (anonymous access)"));
                    }
                    for scheme in names {
                        if !schemes.contains(scheme) {
                            problems.push(format!("{name}: security scheme '{scheme}' is not in components"));
                        }
                    }
                }
            }
            _ => problems.push(format!("{name}: declares no security")),
        }
    }
    assert!(problems.is_empty(), "operations missing responses or security:\n  {}", problems.join("\n  "));
}
