//! What `sluice plugins`, `routes` and `stats` print for people, made from
//! the admin API's answers: a table, then a line for each thing that needs
//! reading in full (a refusal, why a route is not ready).

use std::fmt::Write;

use serde_json::Value;

use super::table::{Table, ago, count, rate, short_hash};

/// `sluice plugins`: each plugin's live version, when it was deployed, how
/// many earlier versions are kept, and its shadow candidate.
pub fn plugins(plugins: &[Value]) -> String {
    let mut table = Table::new(&[
        "PLUGIN",
        "LIVE VERSION",
        "DEPLOYED",
        "EARLIER",
        "SHADOW",
        "SOURCE",
    ])
    .numbers(&["EARLIER"]);
    let mut notes = String::new();
    for plugin in plugins {
        let name = text(&plugin["name"]);
        let current = &plugin["current"];
        let shadow = &plugin["shadow"];
        table.row(vec![
            name.clone(),
            short_hash(&text(&current["hash"])),
            ago(current["loaded_at_ms"].as_u64()),
            plugin["earlier"].as_array().map_or(0, Vec::len).to_string(),
            match shadow["hash"].as_str() {
                Some(hash) => format!(
                    "{} on {}%",
                    short_hash(hash),
                    // To a tenth of a percent: 1/3 shows as 33.3.
                    (shadow["sample"].as_f64().unwrap_or(1.0) * 1000.0).round() / 10.0
                ),
                None => "-".into(),
            },
            text(&current["source"]),
        ]);
        if current["source"] == crate::deploy::LAST_GOOD {
            let _ = writeln!(
                notes,
                "plugin {name}: RUNNING ITS LAST GOOD VERSION: its file was refused at start"
            );
        }
        if let Some(error) = plugin["last_error"].as_str() {
            let _ = writeln!(notes, "plugin {name}: last refused version: {error}");
        }
    }
    with_notes(table, notes)
}

/// `sluice routes`: each route's state, what it reads and runs, and what
/// waits behind it.
pub fn routes(routes: &[Value]) -> String {
    let mut table = Table::new(&[
        "ROUTE", "STATE", "TOPICS", "GROUP", "BACKEND", "PLUGIN", "BACKLOG",
    ])
    .numbers(&["BACKLOG"]);
    let mut notes = String::new();
    for route in routes {
        let name = text(&route["name"]);
        let topics: Vec<&str> = route["topics"]
            .as_array()
            .map(|t| t.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        table.row(vec![
            name.clone(),
            state(route),
            topics.join(", "),
            text(&route["group"]),
            text(&route["backend"]),
            text(&route["plugin"]),
            count(&route["backlog"]),
        ]);
        if let Some(trouble) = route["trouble"].as_str() {
            let _ = writeln!(notes, "route {name}: {trouble}");
        }
    }
    with_notes(table, notes)
}

/// `sluice stats`: each route's counters, depth, rate and last activity,
/// then each plugin's calls and failed calls. `rates` are the routes'
/// handled messages a second, in the order of `routes`.
pub fn stats(routes: &[Value], rates: &[Option<f64>], plugins: &[Value]) -> String {
    let mut table = Table::new(&[
        "ROUTE",
        "HANDLED",
        "RETRIED",
        "DEAD-LETTERED",
        "BACKEND ERRORS",
        "IN FLIGHT",
        "PENDING",
        "BACKLOG",
        "MSG/S",
        "LAST ACTIVITY",
    ])
    .numbers(&[
        "HANDLED",
        "RETRIED",
        "DEAD-LETTERED",
        "BACKEND ERRORS",
        "IN FLIGHT",
        "PENDING",
        "BACKLOG",
        "MSG/S",
    ]);
    for (route, per_second) in routes.iter().zip(rates) {
        let stats = &route["stats"];
        table.row(vec![
            text(&route["name"]),
            count(&stats["succeeded"]),
            count(&stats["retried"]),
            count(&stats["dead_lettered"]),
            count(&stats["backend_errors"]),
            count(&stats["in_flight"]),
            count(&route["pending"]),
            count(&route["backlog"]),
            rate(*per_second),
            ago(route["last_activity_ms"].as_u64()),
        ]);
    }
    let failures = ["CALLS", "TRAPS", "TIMEOUTS", "MEMORY CAP", "OUTPUT CAP"];
    let mut by_plugin = Table::new(&[&["PLUGIN"][..], &failures[..]].concat()).numbers(&failures);
    for plugin in plugins {
        let counters = &plugin["counters"];
        by_plugin.row(vec![
            text(&plugin["name"]),
            count(&counters["calls"]),
            count(&counters["traps"]),
            count(&counters["timeouts"]),
            count(&counters["memory_limit_hits"]),
            count(&counters["output_limit_hits"]),
        ]);
    }
    format!("{table}\n{by_plugin}")
}

/// Messages each route finished (handled or dead-lettered) a second
/// between two answers of `/api/routes` taken `seconds` apart; by name, so
/// a route added or removed in between has none.
pub fn rates(before: &[Value], after: &[Value], seconds: f64) -> Vec<Option<f64>> {
    let finished = |route: &Value| -> Option<u64> {
        let stats = &route["stats"];
        Some(stats["succeeded"].as_u64()? + stats["dead_lettered"].as_u64()?)
    };
    after
        .iter()
        .map(|route| {
            if seconds <= 0.0 {
                return None;
            }
            let earlier = before.iter().find(|r| r["name"] == route["name"])?;
            let done = finished(route)?.checked_sub(finished(earlier)?)?;
            Some(done as f64 / seconds)
        })
        .collect()
}

/// `running`, `paused` or `not-ready`, as the API says (or, from a host
/// that does not say, as its other fields tell).
fn state(route: &Value) -> String {
    if let Some(state) = route["state"].as_str() {
        return state.to_string();
    }
    if route["paused"].as_bool() == Some(true) {
        "paused".into()
    } else if route["trouble"].is_string() {
        "not-ready".into()
    } else {
        "running".into()
    }
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

fn with_notes(table: Table, notes: String) -> String {
    match notes.is_empty() {
        true => table.to_string(),
        false => format!("{table}\n{notes}"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_route_row_says_its_state_topics_and_backlog() {
        let routes = [json!({
            "name": "orders", "topics": ["orders.*", "refunds"], "group": "g",
            "backend": "main", "plugin": "p", "paused": false, "state": "running",
            "trouble": null, "backlog": null,
        })];
        let text = super::routes(&routes);
        let mut lines = text.lines();
        assert!(lines.next().unwrap().starts_with("ROUTE "), "{text}");
        let row: Vec<&str> = lines
            .next()
            .unwrap()
            .split("  ")
            .filter(|c| !c.is_empty())
            .collect();
        let row: Vec<&str> = row.iter().map(|c| c.trim()).collect();
        assert_eq!(
            row,
            [
                "orders",
                "running",
                "orders.*, refunds",
                "g",
                "main",
                "p",
                "-"
            ]
        );
    }

    #[test]
    fn rates_come_from_two_answers() {
        let at = |handled: u64, dead: u64| json!({"name": "r", "stats": {"succeeded": handled, "dead_lettered": dead}});
        assert_eq!(rates(&[at(10, 0)], &[at(30, 2)], 2.0), [Some(11.0)]);
        assert_eq!(rates(&[], &[at(30, 2)], 2.0), [None]);
        assert_eq!(rates(&[at(10, 0)], &[at(30, 2)], 0.0), [None]);
    }
}
