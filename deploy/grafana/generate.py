#!/usr/bin/env python3
"""Generate deploy/grafana/aiod.json, aiod's Grafana dashboard.

    .venv/bin/python deploy/grafana/generate.py            # rewrite aiod.json
    .venv/bin/python deploy/grafana/generate.py --check    # exit 1 if it differs

Built with grafana-foundation-sdk (Grafana's own builders, pinned in the
test extras so the output does not change under us). `make test` runs
--check (tests/test_deploy_grafana.py) and queries every panel against a real
Prometheus that scraped a real aiod (tests/system/test_prometheus.py).

Conventions (those of the monitoring mixins' dashboard linter): a datasource
variable; `job` and `instance` variables used by every query; rate windows of
$__rate_interval; a unit and a description on every panel. aiod's own job
label arrives as `exported_job` (Prometheus's `job` is the scrape job).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import heatmap as heatmap_m
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT = Path(__file__).resolve().parent / "aiod.json"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")

# Every selector carries these; panels add their own matchers after them.
SEL = 'job=~"$job", instance=~"$instance"'
POOL = f'{SEL}, pool=~"$pool"'
JOB = f'{SEL}, exported_job=~"$aiod_job"'
PROBES = f'aiod_job_info{{{JOB}, type="probe"}}'
BY_JOB = "on (job, instance, exported_job)"


def query(expr: str, legend: str = "__auto", ref: str = "A",
          fmt: PromQueryFormat | None = None) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).range()
    if fmt is not None:
        q = q.format(fmt)
    return q


def series(title: str, description: str, unit: str, *queries: prometheus.Dataquery,
           w: int = 12, h: int = 8, stack: bool = False,
           min_zero: bool = True) -> timeseries.Panel:
    p = (timeseries.Panel().title(title).description(description).unit(unit)
         .datasource(DS).height(h).span(w).fill_opacity(10).line_width(1)
         .legend(common_b.VizLegendOptions().display_mode(common.LegendDisplayMode.TABLE)
                 .placement(common.LegendPlacement.BOTTOM).show_legend(True)
                 .calcs(["mean", "max", "lastNotNull"]))
         .tooltip(common_b.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                  .sort(common.SortOrder.DESCENDING)))
    if min_zero:
        p = p.min(0)
    if stack:
        p = p.stacking(common_b.StackingConfig().mode(common.StackingMode.NORMAL))
    for q in queries:
        p = p.with_target(q)
    return p


def single(title: str, description: str, unit: str, expr: str, w: int = 6,
           decimals: int | None = None) -> stat.Panel:
    p = (stat.Panel().title(title).description(description).unit(unit).datasource(DS)
         .height(4).span(w).with_target(query(expr))
         .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]))
         .graph_mode(common.BigValueGraphMode.AREA))
    if decimals is not None:
        p = p.decimals(decimals)
    return p


def variables(d: dash.Dashboard) -> dash.Dashboard:
    def label_values(name: str, label: str, selector: str, title: str,
                     description: str) -> dash.QueryVariable:
        return (dash.QueryVariable(name).label(title).description(description)
                .datasource(DS)
                .query({"query": f"label_values({selector}, {label})", "refId": "vars",
                        "qryType": 1})
                .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                .sort(VariableSort.ALPHABETICAL_ASC)
                .multi(True).include_all(True).all_value(".+"))

    return (d.with_variable(dash.DatasourceVariable("datasource").label("Data source")
                            .description("The Prometheus that scrapes aiod.")
                            .type("prometheus"))
            .with_variable(label_values("job", "job", "aiod_build_info", "Scrape job",
                                        "Prometheus scrape job(s) of aiod (the alert rules "
                                        "assume job=\"aiod\")."))
            .with_variable(label_values("instance", "instance",
                                        'aiod_build_info{job=~"$job"}', "Instance",
                                        "The aiod instances (one per host)."))
            .with_variable(label_values("pool", "pool", f"aiod_contexts{{{SEL}}}", "Pool",
                                        "aiod context pools."))
            .with_variable(label_values("aiod_job", "exported_job",
                                        f"aiod_job_info{{{SEL}}}", "aiod job",
                                        "aiod's probe and load jobs (the exported_job label).")))


def build() -> dash.Dashboard:
    def quantile(q: str) -> str:
        return (f"histogram_quantile({q}, sum by (instance, exported_job, le) ("
                f"rate(aiod_op_latency_seconds_bucket{{{JOB}}}[$__rate_interval]) "
                f"and {BY_JOB} {PROBES}))")

    d = (dash.Dashboard("aiod").uid("aiod-overview")
         .description("aiod: kernel AIO latency probes, load, failures, hung I/O, context "
                      "lifecycle and the host's AIO headroom. Generated by "
                      "deploy/grafana/generate.py; edit that, not this file.")
         .tags(["aiod", "io", "storage"]).editable().time("now-6h", "now")
         .refresh("1m").timezone("browser").tooltip(DashboardCursorSync.CROSSHAIR)
         .timepicker(dash.TimePicker().refresh_intervals(["30s", "1m", "5m", "15m"])))
    d = variables(d)

    d = d.with_row(dash.Row("Overview"))
    d = (d.with_panel(single(
            "Instances up", "aiod instances that answered Prometheus's last scrape (the "
            "AiodDown alert fires for one that has not for 5 minutes).", "none",
            f'sum(up{{{SEL}}})', w=4))
         .with_panel(single(
            "Probes completing", "Probe jobs that completed an operation in the last 5 minutes "
            "(the AiodProbeStalled alert fires for the others).", "none",
            f"count((time() - aiod_job_last_completion_timestamp_seconds{{{JOB}}} < 300) "
            f"and {BY_JOB} {PROBES}) or vector(0)", w=4))
         .with_panel(single(
            "Failed ops (rate)", "Operations failing per second, any errno.", "ops",
            f"sum(rate(aiod_ops_failed_any_total{{{JOB}}}[$__rate_interval]))", w=4,
            decimals=2))
         .with_panel(single(
            "Oldest op in flight", "The oldest operation in flight in any selected pool: "
            "hung I/O shows here long before anything else.", "s",
            f"max(aiod_ops_oldest_in_flight_seconds{{{POOL}}})", w=4))
         .with_panel(single(
            "AIO headroom", "Share of fs.aio-max-nr still free on the most loaded host "
            "(io_setup fails with EAGAIN at 0).", "percentunit",
            f"min(1 - aiod_kernel_aio_nr{{{SEL}}} / aiod_kernel_aio_max_nr{{{SEL}}})", w=4))
         .with_panel(single(
            "Reloads failing", "Instances whose last configuration reload failed (they keep "
            "the previous configuration).", "none",
            f"count(aiod_config_last_reload_successful{{{SEL}}} == 0) or vector(0)", w=4)))

    d = d.with_row(dash.Row("Probe latency"))
    d = (d.with_panel(
            heatmap.Panel().title("Probe latency distribution")
            .description("Operations per latency bucket of the probe jobs, submit to "
                         "completion (aiod_op_latency_seconds). A band moving up is a slower "
                         "device; a second band is a minority of slow operations.")
            .datasource(DS).height(9).span(12).unit("s").calculate(False)
            .y_axis(heatmap.YAxisConfig().unit("s"))
            .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE))
            .color(heatmap.HeatmapColorOptions().mode(heatmap_m.HeatmapColorMode.SCHEME)
                   .scheme("Oranges").exponent(0.5).steps(64)
                   .scale(heatmap_m.HeatmapColorScale.EXPONENTIAL))
            .cell_values(heatmap.CellValues().unit("short"))
            .with_target(query(
                "sum by (le) (increase(aiod_op_latency_seconds_bucket{"
                f"{JOB}}}[$__rate_interval]) and {BY_JOB} {PROBES})",
                legend="{{le}}", fmt=PromQueryFormat.HEATMAP)))
         .with_panel(series(
            "Probe latency percentiles",
            "p50 and p99 latency of each probe job, interpolated inside the histogram's "
            "buckets (10 us .. 10 s). The AiodProbeLatencyHigh alert watches p99.", "s",
            query(quantile("0.99"), "{{instance}} {{exported_job}} p99", "A"),
            query(quantile("0.5"), "{{instance}} {{exported_job}} p50", "B"),
            h=9)))

    d = d.with_row(dash.Row("Throughput and errors"))
    d = (d.with_panel(series(
            "IOPS by job",
            "Operations completed per second by each aiod job and kernel op (probes at their "
            "configured rate, load jobs as fast as the device allows).", "iops",
            query("sum by (instance, exported_job, op) (rate(aiod_ops_completed_total{"
                  f"{JOB}}}[$__rate_interval]))", "{{instance}} {{exported_job}} {{op}}"),
            stack=True))
         .with_panel(series(
            "Failed operations by errno",
            "Operations the kernel failed, per second, by errno (EIO: device error; ENOSPC: "
            "full; EINVAL: O_DIRECT not supported). The total has a series from the start; "
            "an errno's series appears with its first failure.", "ops",
            query("sum by (instance, exported_job, errno) (rate(aiod_ops_failed_total{"
                  f"{JOB}}}[$__rate_interval]))",
                  "{{instance}} {{exported_job}} {{errno}}", "A"),
            query("sum by (instance) (rate(aiod_ops_failed_any_total{"
                  f"{JOB}}}[$__rate_interval]))", "{{instance}} total", "B")))
         .with_panel(series(
            "Job errors by reason",
            "Errors that are not an operation's own outcome: a missing target, a permission "
            "error, a full disk, a refused write. The job retries its target every 10 s.",
            "short",
            query("sum by (instance, exported_job, reason) (increase(aiod_job_errors_total{"
                  f"{JOB}}}[$__rate_interval]))",
                  "{{instance}} {{exported_job}} {{reason}}", "A"),
            query("sum by (instance) (increase(aiod_job_errors_any_total{"
                  f"{JOB}}}[$__rate_interval]))", "{{instance}} total", "B")))
         .with_panel(series(
            "Operations skipped",
            "Operations a job did not issue because its iodepth or the pool was full: the "
            "pool is too small for the jobs on it, or the device too slow.", "ops",
            query("sum by (instance, exported_job) (rate(aiod_job_skipped_ops_total{"
                  f"{JOB}}}[$__rate_interval]))", "{{instance}} {{exported_job}}"))))

    d = d.with_row(dash.Row("Hung I/O and contexts"))
    d = (d.with_panel(series(
            "Oldest operation in flight",
            "Age of the oldest operation in flight per pool, against the longest timeout of "
            "the pool's jobs (dashed). Above it is hung I/O (the AiodHungIO alert).", "s",
            query(f"aiod_ops_oldest_in_flight_seconds{{{POOL}}}",
                  "{{instance}} {{pool}}", "A"),
            query(f"max by (instance, pool) (aiod_job_timeout_seconds{{{POOL}}})",
                  "{{instance}} {{pool}} timeout", "B")))
         .with_panel(series(
            "Operations in flight",
            "Operations submitted to the kernel and not yet completed, per pool.", "short",
            query(f"aiod_ops_in_flight{{{POOL}}}", "{{instance}} {{pool}}")))
         .with_panel(series(
            "Operations past their timeout",
            "Operations that stayed in flight longer than their job's timeout, per job "
            "(each counted once).", "short",
            query("sum by (instance, exported_job) (increase(aiod_job_op_timeouts_total{"
                  f"{JOB}}}[$__rate_interval]))", "{{instance}} {{exported_job}}")))
         .with_panel(series(
            "Contexts by state",
            "Kernel AIO contexts per lifecycle state: active while serving; draining, "
            "cancelling while a reload shrinks a pool; failed when io_destroy failed.",
            "short",
            query(f"sum by (instance, pool, state) (aiod_contexts{{{POOL}}})",
                  "{{instance}} {{pool}} {{state}}"),
            stack=True))
         .with_panel(series(
            "Context setups, destroys and failures",
            "io_setup and io_destroy calls per pool, and those that failed.", "short",
            query("sum by (instance, pool) (increase(aiod_context_setups_total{"
                  f"{POOL}}}[$__rate_interval]))", "{{instance}} {{pool}} setups", "A"),
            query("sum by (instance, pool) (increase(aiod_context_destroys_total{"
                  f"{POOL}}}[$__rate_interval]))", "{{instance}} {{pool}} destroys", "B"),
            query("sum by (instance, pool) (increase(aiod_context_setup_failures_any_total{"
                  f"{POOL}}}[$__rate_interval]))",
                  "{{instance}} {{pool}} setup failures", "C"),
            query("sum by (instance, pool) (increase(aiod_context_destroy_failures_total{"
                  f"{POOL}}}[$__rate_interval]))",
                  "{{instance}} {{pool}} destroy failures", "D"))))

    d = d.with_row(dash.Row("AIO headroom"))
    d = (d.with_panel(series(
            "fs.aio-nr and fs.aio-max-nr",
            "AIO events allocated on the host by every process (fs.aio-nr) and the limit "
            "(fs.aio-max-nr). At the limit io_setup fails with EAGAIN for everyone.", "short",
            query(f"aiod_kernel_aio_nr{{{SEL}}}", "{{instance}} aio-nr", "A"),
            query(f"aiod_kernel_aio_max_nr{{{SEL}}}", "{{instance}} aio-max-nr", "B")))
         .with_panel(series(
            "AIO headroom and 6 h forecast",
            "Share of fs.aio-max-nr in use, now and as the last hour's trend predicts it in "
            "6 hours (the AiodAioNrExhaustionForecast alert).", "percentunit",
            query(f"aiod_kernel_aio_nr{{{SEL}}} / aiod_kernel_aio_max_nr{{{SEL}}}",
                  "{{instance}} used", "A"),
            query(f"predict_linear(aiod_kernel_aio_nr{{{SEL}}}[1h], 6 * 3600) / "
                  f"aiod_kernel_aio_max_nr{{{SEL}}}", "{{instance}} in 6 h", "B"),
            min_zero=True)))
    return d


def render() -> str:
    model = build().build()
    return json.dumps(model, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help=f"exit 1 when {OUT.name} differs from what this script generates")
    ap.add_argument("--output", type=Path, default=OUT)
    args = ap.parse_args()
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is not what deploy/grafana/generate.py makes: "
                  "run it and commit the result", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
