//! Renders the host's counters in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{AdminState, Depth};
use crate::deploy::PluginCounters;
use crate::router::StatsSnapshot;

/// A metric family of routes: name, help text, and how to read it.
type RouteFamily = (&'static str, &'static str, fn(&StatsSnapshot) -> u64);
/// A metric family of plugins.
type PluginFamily = (
    &'static str,
    &'static str,
    fn(&PluginCounters) -> &AtomicU64,
);

/// `depths[i]` is what route i's backend reports of its group.
pub fn render(state: &AdminState, depths: &[Depth]) -> String {
    let mut out = String::new();
    let route_counters: [RouteFamily; 8] = [
        (
            "sluice_route_received_total",
            "Deliveries fetched, redeliveries included.",
            |s| s.received,
        ),
        (
            "sluice_route_acked_total",
            "Inputs handled and acknowledged.",
            |s| s.succeeded,
        ),
        ("sluice_route_outputs_total", "Outputs published.", |s| {
            s.published
        }),
        (
            "sluice_route_retried_total",
            "Failed attempts scheduled for another try.",
            |s| s.retried,
        ),
        (
            "sluice_route_dead_lettered_total",
            "Inputs sent to the dead-letter topic.",
            |s| s.dead_lettered,
        ),
        (
            "sluice_route_plugin_errors_total",
            "Calls that trapped, timed out or hit the memory cap.",
            |s| s.plugin_errors,
        ),
        (
            "sluice_route_backend_errors_total",
            "Failed backend operations.",
            |s| s.backend_errors,
        ),
        (
            "sluice_route_leases_lost_total",
            "Deliveries whose lease ran out before they were settled (another consumer has them).",
            |s| s.lease_lost,
        ),
    ];
    let snapshots: Vec<_> = state
        .routes
        .iter()
        .map(|r| (r, r.stats.snapshot()))
        .collect();
    for (name, help, value) in route_counters {
        header(&mut out, name, help, "counter");
        for (route, snapshot) in &snapshots {
            writeln!(
                out,
                "{name}{{route=\"{}\"}} {}",
                escape(&route.name),
                value(snapshot)
            )
            .unwrap();
        }
    }
    header(
        &mut out,
        "sluice_route_in_flight",
        "Deliveries fetched and not yet settled.",
        "gauge",
    );
    for (route, snapshot) in &snapshots {
        writeln!(
            out,
            "sluice_route_in_flight{{route=\"{}\"}} {}",
            escape(&route.name),
            snapshot.in_flight
        )
        .unwrap();
    }
    header(
        &mut out,
        "sluice_route_pending",
        "Messages of the route's group delivered and unsettled or delayed, as the backend reports them.",
        "gauge",
    );
    for (route, depth) in state.routes.iter().zip(depths) {
        if let Some(count) = depth.pending {
            writeln!(
                out,
                "sluice_route_pending{{route=\"{}\"}} {count}",
                escape(&route.name)
            )
            .unwrap();
        }
    }
    header(
        &mut out,
        "sluice_route_backlog",
        "Messages published to the route's topics and not yet delivered to its group, as the backend reports them.",
        "gauge",
    );
    for (route, depth) in state.routes.iter().zip(depths) {
        if let Some(count) = depth.backlog {
            writeln!(
                out,
                "sluice_route_backlog{{route=\"{}\"}} {count}",
                escape(&route.name)
            )
            .unwrap();
        }
    }
    header(
        &mut out,
        "sluice_route_paused",
        "1 while the route is paused.",
        "gauge",
    );
    for route in &state.routes {
        writeln!(
            out,
            "sluice_route_paused{{route=\"{}\"}} {}",
            escape(&route.name),
            route.control.is_paused() as u8
        )
        .unwrap();
    }
    header(
        &mut out,
        "sluice_handler_duration_seconds",
        "Time spent in the handler per call.",
        "histogram",
    );
    for route in &state.routes {
        let (buckets, count, sum) = route.stats.handler_latency.read();
        let label = escape(&route.name);
        for (bound, n) in buckets {
            writeln!(
                out,
                "sluice_handler_duration_seconds_bucket{{route=\"{label}\",le=\"{bound}\"}} {n}"
            )
            .unwrap();
        }
        writeln!(
            out,
            "sluice_handler_duration_seconds_bucket{{route=\"{label}\",le=\"+Inf\"}} {count}"
        )
        .unwrap();
        writeln!(
            out,
            "sluice_handler_duration_seconds_sum{{route=\"{label}\"}} {sum}"
        )
        .unwrap();
        writeln!(
            out,
            "sluice_handler_duration_seconds_count{{route=\"{label}\"}} {count}"
        )
        .unwrap();
    }

    let plugin_counters: [PluginFamily; 5] = [
        ("sluice_plugin_calls_total", "Calls into the plugin.", |c| {
            &c.calls
        }),
        ("sluice_plugin_traps_total", "Calls that trapped.", |c| {
            &c.traps
        }),
        (
            "sluice_plugin_timeouts_total",
            "Calls stopped at their deadline.",
            |c| &c.timeouts,
        ),
        (
            "sluice_plugin_memory_limit_hits_total",
            "Calls stopped at the memory cap.",
            |c| &c.memory_limit_hits,
        ),
        (
            "sluice_plugin_output_limit_hits_total",
            "Calls that handed the host more outputs or bytes than allowed.",
            |c| &c.output_limit_hits,
        ),
    ];
    for (name, help, counter) in plugin_counters {
        header(&mut out, name, help, "counter");
        for slot in state.deployer.slots() {
            writeln!(
                out,
                "{name}{{plugin=\"{}\"}} {}",
                escape(&slot.name),
                counter(&slot.counters).load(Ordering::Relaxed)
            )
            .unwrap();
        }
    }
    header(
        &mut out,
        "sluice_plugin_log_lines_dropped_total",
        "Plugin log lines dropped over the plugin's rate.",
        "counter",
    );
    for slot in state.deployer.slots() {
        writeln!(
            out,
            "sluice_plugin_log_lines_dropped_total{{plugin=\"{}\"}} {}",
            escape(&slot.name),
            slot.current().settings.log_budget.dropped()
        )
        .unwrap();
    }
    header(
        &mut out,
        "sluice_plugin_running_last_good",
        "1 while a plugin runs the last good version it ran, because its file was refused at start.",
        "gauge",
    );
    for slot in state.deployer.slots() {
        let fallback = slot.current_info().source == crate::deploy::LAST_GOOD;
        writeln!(
            out,
            "sluice_plugin_running_last_good{{plugin=\"{}\"}} {}",
            escape(&slot.name),
            u8::from(fallback)
        )
        .unwrap();
    }
    header(
        &mut out,
        "sluice_plugin_version_info",
        "The running version of each plugin.",
        "gauge",
    );
    for slot in state.deployer.slots() {
        let info = slot.current_info();
        writeln!(
            out,
            "sluice_plugin_version_info{{plugin=\"{}\",version=\"{}\",loaded_at_ms=\"{}\"}} 1",
            escape(&slot.name),
            &info.hash[..12],
            info.loaded_at_ms
        )
        .unwrap();
    }
    header(
        &mut out,
        "sluice_plugin_shadow_total",
        "Messages a shadow candidate handled too, by how its result compared with the live version's.",
        "counter",
    );
    for slot in state.deployer.slots() {
        let Some(shadow) = slot.shadow() else {
            continue;
        };
        let report = shadow.report();
        for (result, count) in [
            ("same", report.same),
            ("different", report.different),
            ("candidate_failed", report.candidate_failed),
        ] {
            writeln!(
                out,
                "sluice_plugin_shadow_total{{plugin=\"{}\",candidate=\"{}\",result=\"{result}\"}} {count}",
                escape(&slot.name),
                &report.candidate.hash[..12],
            )
            .unwrap();
        }
    }

    header(
        &mut out,
        "sluice_backend_up",
        "1 if every route on the backend fetched successfully last time.",
        "gauge",
    );
    for backend in &state.backends {
        let up = state
            .routes
            .iter()
            .filter(|r| r.backend == backend.name)
            .all(|r| r.stats.backend_ok.load(Ordering::Relaxed));
        writeln!(
            out,
            "sluice_backend_up{{backend=\"{}\",kind=\"{}\"}} {}",
            escape(&backend.name),
            backend.kind,
            up as u8
        )
        .unwrap();
    }

    header(
        &mut out,
        "sluice_backend_state_restored_total",
        "Server-side state (consumer, group, queue, table) found lost and made again, by kind of backend.",
        "counter",
    );
    for (kind, count) in crate::backend::restored() {
        writeln!(
            out,
            "sluice_backend_state_restored_total{{kind=\"{kind}\"}} {count}"
        )
        .unwrap();
    }
    out
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    writeln!(out, "# HELP {name} {help}").unwrap();
    writeln!(out, "# TYPE {name} {kind}").unwrap();
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
