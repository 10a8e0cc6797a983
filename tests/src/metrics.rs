//! Reading a proxy's Prometheus metrics in tests: `/metrics` fetched from the node's netns and
//! parsed into samples.
use std::collections::BTreeMap;

use anyhow::{bail, Context as _, Result};

/// One sample: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A scrape of `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses the text exposition format (OpenMetrics or Prometheus). Fails on a line it
    /// cannot read, so a malformed exposition fails the test.
    pub fn parse(text: &str) -> Result<Self> {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            samples.push(parse_line(line).with_context(|| format!("metrics line {line:?}"))?);
        }
        Ok(Self { samples })
    }

    /// The sum of `name` over samples whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

fn parse_line(line: &str) -> Result<Sample> {
    let (name, rest) = match line.find('{') {
        Some(at) => (&line[..at], &line[at..]),
        None => line.split_at(line.find(' ').context("no value")?),
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let end = closing_brace(body).context("no closing brace")?;
        let mut chars = body[..end].chars().peekable();
        while chars.peek().is_some() {
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            if chars.next() != Some('"') {
                bail!("label {key} is not quoted");
            }
            let mut value = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some(other) => value.push(other),
                        None => bail!("dangling escape"),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.insert(key.trim().to_owned(), value);
            if chars.peek() == Some(&',') {
                chars.next();
            }
        }
        &body[end + 1..]
    } else {
        rest
    };
    let value = rest
        .split_whitespace()
        .next()
        .context("no value")?
        .parse()
        .context("value is not a number")?;
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Where the label set ends (a `}` outside quotes).
fn closing_brace(body: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_and_without_labels_are_read() {
        let s = Scrape::parse(
            "# HELP x y\n# TYPE a counter\na_total{k=\"v\",q=\"a,b}\\\"c\"} 3\nb 1.5\n# EOF\n",
        )
        .unwrap();
        assert_eq!(s.sum("a_total", &[("k", "v")]), 3.0);
        assert_eq!(s.samples[0].labels["q"], "a,b}\"c");
        assert_eq!(s.sum("b", &[]), 1.5);
        assert_eq!(s.sum("a_total", &[("k", "w")]), 0.0);
        assert!(Scrape::parse("a{k=v} 1").is_err());
    }
}
