// The training page: follows the newest run over Server-Sent Events. The run lives on the
// server; this only shows it, so a reload (or another browser) shows the same run.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  function show(run) {
    $("no-run").hidden = run.id !== null;
    if (run.id === null) return;
    $("run-id").textContent = "#" + run.id;
    $("run-stage").textContent = run.stage;
    $("run-loss").textContent = run.loss === null ? "–" : run.loss.toFixed(4);
    $("run-eta").textContent = run.eta === null ? "–" : run.eta;
    const bar = $("run-progress");
    if (run.fraction === null) bar.removeAttribute("value"); else bar.value = run.fraction;
    bar.hidden = run.finished;
    $("run-outcome").textContent = [run.decision, run.error].filter(Boolean).join("\n");
    $("run-log").textContent = run.log;
    const chart = $("run-chart");
    if (run.chart) { chart.src = run.chart; chart.hidden = false; }
    document.body.dataset.runStage = run.stage;
    document.body.dataset.runFinished = String(run.finished);
  }
  const stream = new EventSource("/admin/training/events");
  stream.onmessage = (event) => show(JSON.parse(event.data));
})();
