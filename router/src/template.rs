//! Topic templates (DESIGN.md, "Topic template variables").
//!
//! A template is compiled once, when the config is loaded, so that a bad
//! template is a config error naming the field rather than a bad topic at
//! run time.

use std::fmt;

/// One piece of a compiled template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Literal(String),
    /// `{peer}`: the peer's name, or its source IP when unknown.
    Peer,
    /// `{ip}`: the source IP address.
    Ip,
    /// `{port}`: the source UDP port.
    Port,
    /// `{path}`: all Uri-Path segments joined by `/`.
    Path,
    /// `{path.N}`: Uri-Path segment N, counted from 0.
    PathSegment(usize),
    /// `{method}`: the CoAP method, e.g. `POST`.
    Method,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl Template {
    /// Parses and checks a template: known variables only, and no literal
    /// text that would make the topic invalid (MQTT 3.1.1 section 4.7: topic
    /// names carry no `+` or `#` wildcards and no NUL; UTF-8 is given by `&str`).
    pub fn compile(source: &str) -> Result<Template, String> {
        if source.is_empty() {
            return Err("empty topic template".into());
        }
        let mut parts = Vec::new();
        let mut rest = source;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return Err(format!("unmatched '}}' in topic template {source:?}"));
                }
                Some(i) => {
                    push_literal(&mut parts, &rest[..i])?;
                    let close = rest[i..]
                        .find('}')
                        .ok_or_else(|| format!("unclosed '{{' in topic template {source:?}"))?;
                    parts.push(variable(&rest[i + 1..i + close])?);
                    rest = &rest[i + close + 1..];
                }
                None => {
                    push_literal(&mut parts, rest)?;
                    rest = "";
                }
            }
        }
        Ok(Template {
            source: source.to_owned(),
            parts,
        })
    }

    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn push_literal(parts: &mut Vec<Part>, text: &str) -> Result<(), String> {
    if let Some(bad) = text.chars().find(|c| matches!(c, '+' | '#' | '\0')) {
        return Err(format!(
            "topic template contains {bad:?}, which is not allowed in an MQTT topic name"
        ));
    }
    if !text.is_empty() {
        parts.push(Part::Literal(text.to_owned()));
    }
    Ok(())
}

fn variable(name: &str) -> Result<Part, String> {
    Ok(match name {
        "peer" => Part::Peer,
        "ip" => Part::Ip,
        "port" => Part::Port,
        "path" => Part::Path,
        "method" => Part::Method,
        _ => match name.strip_prefix("path.").map(str::parse::<usize>) {
            Some(Ok(n)) => Part::PathSegment(n),
            _ => {
                return Err(format!(
                    "unknown template variable {{{name}}}; known: {{peer}} {{ip}} {{port}} \
                     {{path}} {{path.N}} {{method}}"
                ))
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_variables_and_literals() {
        let t = Template::compile("plant/{peer}/{path.1}/x").unwrap();
        assert_eq!(
            t.parts(),
            &[
                Part::Literal("plant/".into()),
                Part::Peer,
                Part::Literal("/".into()),
                Part::PathSegment(1),
                Part::Literal("/x".into()),
            ]
        );
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in [
            "", "a/+/b", "a/#", "{nope}", "{path.x}", "a/{peer", "a}", "a\0",
        ] {
            assert!(Template::compile(bad).is_err(), "{bad:?} accepted");
        }
    }
}
