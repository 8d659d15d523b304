//! OpenMetrics 1.0 text for `/metrics` when the client asks for it: the same metric families
//! the Prometheus registry gathers, written in OpenMetrics form (counter families named
//! without `_total`, canonical `le` values, `# EOF`), with an exemplar on each bucket of
//! `cnsm_transition_duration_seconds` that has one: `# {trace_id="..."} VALUE TIMESTAMP`, the
//! trace of the last transition of that machine that fell in the bucket
//! ([`cnsm_runtime::telemetry::TransitionExemplars`]). The `prometheus` crate has no OpenMetrics
//! encoder, and the OpenTelemetry SDK in use records no exemplars, hence this module.

use std::fmt::Write as _;

use cnsm_runtime::telemetry::TransitionExemplars;
use prometheus::proto::{LabelPair, MetricFamily, MetricType};

/// The family whose buckets carry exemplars, and the label naming the machine.
const DURATION_FAMILY: &str = "cnsm_transition_duration_seconds";
const MACHINE_LABEL: &str = "cnsm_machine_name";

/// Encodes `families` as OpenMetrics text, with `exemplars` on the transition duration buckets.
pub fn encode(families: &[MetricFamily], exemplars: Option<&TransitionExemplars>) -> String {
    let mut out = String::new();
    for family in families {
        let name = family.name();
        let kind = family.get_field_type();
        let (family_name, kind_text) = match kind {
            MetricType::COUNTER => (name.strip_suffix("_total").unwrap_or(name), "counter"),
            MetricType::GAUGE => (name, "gauge"),
            MetricType::HISTOGRAM => (name, "histogram"),
            MetricType::SUMMARY => (name, "summary"),
            MetricType::UNTYPED => (name, "unknown"),
        };
        let _ = writeln!(out, "# TYPE {family_name} {kind_text}");
        if !family.help().is_empty() {
            let _ = writeln!(out, "# HELP {family_name} {}", escape(family.help()));
        }
        for metric in family.get_metric() {
            let labels = metric.get_label();
            match kind {
                MetricType::COUNTER => {
                    sample(&mut out, family_name, "_total", labels, None);
                    let _ = writeln!(out, " {}", number(metric.get_counter().get_value()));
                }
                MetricType::GAUGE => {
                    sample(&mut out, family_name, "", labels, None);
                    let _ = writeln!(out, " {}", number(metric.get_gauge().get_value()));
                }
                #[allow(deprecated)] // untyped values are protobuf-only in prometheus 0.14
                MetricType::UNTYPED => {
                    sample(&mut out, family_name, "", labels, None);
                    let _ = writeln!(out, " {}", number(metric.get_untyped().get_value()));
                }
                MetricType::SUMMARY => {
                    let summary = metric.get_summary();
                    for q in summary.get_quantile() {
                        let quantile = number(q.quantile());
                        sample(
                            &mut out,
                            family_name,
                            "",
                            labels,
                            Some(("quantile", &quantile)),
                        );
                        let _ = writeln!(out, " {}", number(q.value()));
                    }
                    sample(&mut out, family_name, "_sum", labels, None);
                    let _ = writeln!(out, " {}", number(summary.sample_sum()));
                    sample(&mut out, family_name, "_count", labels, None);
                    let _ = writeln!(out, " {}", summary.sample_count());
                }
                MetricType::HISTOGRAM => {
                    let histogram = metric.get_histogram();
                    let machine = (family_name == DURATION_FAMILY)
                        .then(|| {
                            labels
                                .iter()
                                .find(|l| l.name() == MACHINE_LABEL)
                                .map(|l| l.value())
                        })
                        .flatten();
                    let mut bounds: Vec<(f64, u64)> = histogram
                        .get_bucket()
                        .iter()
                        .map(|b| (b.upper_bound(), b.cumulative_count()))
                        .collect();
                    if !bounds.last().is_some_and(|(b, _)| *b == f64::INFINITY) {
                        bounds.push((f64::INFINITY, histogram.get_sample_count()));
                    }
                    for (bound, count) in bounds {
                        let le = if bound == f64::INFINITY {
                            "+Inf".to_owned()
                        } else {
                            number(bound)
                        };
                        sample(&mut out, family_name, "_bucket", labels, Some(("le", &le)));
                        let _ = write!(out, " {count}");
                        let exemplar = machine.zip(exemplars).and_then(|(machine, exemplars)| {
                            exemplars.get(machine, TransitionExemplars::bucket_of(bound))
                        });
                        if let Some(e) = exemplar {
                            let _ = write!(
                                out,
                                " # {{trace_id=\"{}\"}} {} {}",
                                e.trace_id_hex(),
                                number(e.value_s),
                                number(e.time_ms as f64 / 1000.0)
                            );
                        }
                        out.push('\n');
                    }
                    sample(&mut out, family_name, "_sum", labels, None);
                    let _ = writeln!(out, " {}", number(histogram.get_sample_sum()));
                    sample(&mut out, family_name, "_count", labels, None);
                    let _ = writeln!(out, " {}", histogram.get_sample_count());
                }
            }
        }
    }
    out.push_str("# EOF\n");
    out
}

/// Writes `name{labels}` (without the value).
fn sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[LabelPair],
    extra: Option<(&str, &str)>,
) {
    out.push_str(name);
    out.push_str(suffix);
    if labels.is_empty() && extra.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    let pairs = labels.iter().map(|l| (l.name(), l.value())).chain(extra);
    for (name, value) in pairs {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{name}=\"{}\"", escape(value));
    }
    out.push('}');
}

/// A float in canonical form: integral values keep one decimal (`1.0`), `NaN` and infinities
/// as OpenMetrics writes them.
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.1}")
    } else {
        value.to_string()
    }
}

/// Escapes `\`, `"` and newlines (label values and HELP text).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_canonical() {
        assert_eq!(number(1.0), "1.0");
        assert_eq!(number(0.000_01), "0.00001");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(2.5), "2.5");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
