//! A lean gherkin runner: parse `.feature` files with the `gherkin` crate, expand scenario
//! outlines, filter by tags, and hand each concrete case's steps to a matcher.

use std::path::{Path, PathBuf};

/// `../shared/` beside the repository (the same layout in CI).
pub fn shared_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

/// One concrete case: its name, tags (without `@`), and steps with outline values filled in.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub tags: Vec<String>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub text: String,
    pub table: Vec<Vec<String>>,
}

fn clean(tags: &[String]) -> impl Iterator<Item = String> + '_ {
    tags.iter().map(|t| t.trim_start_matches('@').to_owned())
}

fn fill(text: &str, header: &[String], row: &[String]) -> String {
    let mut out = text.to_owned();
    for (h, v) in header.iter().zip(row) {
        out = out.replace(&format!("<{h}>"), v);
    }
    out
}

/// Every concrete case of a feature file.
pub fn cases(path: &Path) -> Vec<Case> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Table cells in the testbed write JSON quotes as `\"`, which is not one of Gherkin's cell
    // escapes (`\|`, `\\`, `\n`) and which the `gherkin` crate refuses; other runners read it as
    // a plain quote, so do the same.
    let text = text.replace("\\\"", "\"");
    let feature = gherkin::Feature::parse(&text, gherkin::GherkinEnv::default())
        .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    let feature_tags: Vec<String> = clean(&feature.tags).collect();
    let background: Vec<&gherkin::Step> = feature
        .background
        .as_ref()
        .map(|b| b.steps.iter().collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    let scenarios = feature
        .scenarios
        .iter()
        .chain(feature.rules.iter().flat_map(|r| r.scenarios.iter()));
    for scenario in scenarios {
        let mut tags = feature_tags.clone();
        tags.extend(clean(&scenario.tags));
        let steps = |header: &[String], row: &[String]| -> Vec<Step> {
            background
                .iter()
                .copied()
                .chain(scenario.steps.iter())
                .map(|s| Step {
                    text: fill(&s.value, header, row),
                    table: s
                        .table
                        .as_ref()
                        .map(|t| {
                            t.rows
                                .iter()
                                .map(|r| r.iter().map(|c| fill(c, header, row)).collect())
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        };
        if scenario.examples.is_empty() {
            out.push(Case {
                name: scenario.name.clone(),
                tags,
                steps: steps(&[], &[]),
            });
            continue;
        }
        for examples in &scenario.examples {
            let Some(table) = &examples.table else {
                continue;
            };
            let Some((header, rows)) = table.rows.split_first() else {
                continue;
            };
            let mut example_tags = tags.clone();
            example_tags.extend(clean(&examples.tags));
            for (i, row) in rows.iter().enumerate() {
                out.push(Case {
                    name: format!("{} #{}", scenario.name, i + 1),
                    tags: example_tags.clone(),
                    steps: steps(header, row),
                });
            }
        }
    }
    out
}

/// The quoted arguments of a step, in order.
pub fn quoted(text: &str) -> Vec<String> {
    text.split('"')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_owned())
        .collect()
}
