//! A few `--flag value` and `--switch` arguments; not worth a parser crate.
#![forbid(unsafe_code)]

use std::collections::HashMap;

use anyhow::{bail, Context as _};

/// Parsed flags of one subcommand.
#[derive(Debug, Default)]
pub struct Flags {
    values: HashMap<String, String>,
    switches: Vec<String>,
}

impl Flags {
    /// Parses `args`: names in `switches` take no value, every other `--name` takes one.
    pub fn parse(args: &[String], switches: &[&str]) -> anyhow::Result<Self> {
        let mut f = Self::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if !a.starts_with("--") {
                bail!("unexpected argument {a:?}");
            }
            if let Some((name, value)) = a.split_once('=') {
                f.values.insert(name.to_string(), value.to_string());
            } else if switches.contains(&a.as_str()) {
                f.switches.push(a.clone());
            } else {
                let v = it.next().with_context(|| format!("{a} needs a value"))?;
                f.values.insert(a.clone(), v.clone());
            }
        }
        Ok(f)
    }

    /// The value of `--name`, if given.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// The value of `--name`, or an error naming it.
    pub fn required(&self, name: &str) -> anyhow::Result<&str> {
        self.value(name)
            .with_context(|| format!("{name} is required"))
    }

    /// The value of `--name` as a number, if given.
    pub fn number<T: std::str::FromStr>(&self, name: &str) -> anyhow::Result<Option<T>> {
        self.value(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| anyhow::anyhow!("{name}: not a number: {v:?}"))
            })
            .transpose()
    }

    /// Whether `--name` was given.
    pub fn switch(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }
}

/// Parses `A,B` into two numbers.
pub fn parse_pair(v: &str) -> Option<(usize, usize)> {
    let (a, b) = v.split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_values_switches_and_equals_form() {
        let f = Flags::parse(
            &strings(&["--runs", "3", "--quick", "--out=x.json"]),
            &["--quick"],
        )
        .unwrap();
        assert_eq!(f.number::<usize>("--runs").unwrap(), Some(3));
        assert!(f.switch("--quick"));
        assert_eq!(f.value("--out"), Some("x.json"));
        assert!(f.required("--listen").is_err());
        assert!(f.number::<u16>("--out").is_err());
    }

    #[test]
    fn refuses_missing_values_and_positionals() {
        assert!(Flags::parse(&strings(&["--runs"]), &[]).is_err());
        assert!(Flags::parse(&strings(&["stray"]), &[]).is_err());
        assert_eq!(parse_pair("0, 1"), Some((0, 1)));
        assert_eq!(parse_pair("0"), None);
    }
}
