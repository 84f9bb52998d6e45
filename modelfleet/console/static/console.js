// The console's few scripts: the viewer's time zone, the usage chart and the playground.
(function () {
  "use strict";
  var body = document.body;
  var base = body.dataset.base;
  var csrf = body.dataset.csrf;

  // The browser's IANA time zone, for days and times on every page.
  var zone = "UTC";
  try { zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC"; } catch (e) { /* UTC */ }
  document.querySelectorAll("[data-tz]").forEach(function (el) { el.value = zone; });
  var secure = location.protocol === "https:" ? "; Secure" : "";
  document.cookie = "mf_tz=" + zone + "; path=" + base + "; SameSite=Strict" + secure;
  // A page rendered in another zone than this browser's (the zone changed): once more in this one.
  var shown = document.querySelector("[data-testid=zone]");
  if (shown && shown.textContent !== zone && !sessionStorage.getItem("mf_tz_reload")) {
    sessionStorage.setItem("mf_tz_reload", "1"); location.reload(); return;
  }

  // The one-time secret: selected whole on focus, ready to copy.
  document.querySelectorAll("[data-select]").forEach(function (el) {
    el.addEventListener("focus", function () { el.select(); });
  });

  // Usage: cost per day (bars) and requests (line).
  var chartEl = document.getElementById("chart");
  if (chartEl && window.uPlot) {
    var data = JSON.parse(chartEl.dataset.chart);
    var xs = data.days.map(function (d, i) { return i; });
    var cost = data.cost.map(function (c) { return c / 1e6; });
    new uPlot({
      width: Math.min(chartEl.clientWidth || 900, 1200), height: 240,
      scales: { x: { time: false, range: [-0.5, xs.length - 0.5] }, req: {} },
      axes: [
        { values: function (u, vals) { return vals.map(function (v) { return data.days[v] ? data.days[v].slice(5) : ""; }); } },
        { label: "cost", size: 70, values: function (u, vals) { return vals.map(function (v) { return +v.toPrecision(3); }); } },
        { scale: "req", side: 1, label: "requests", grid: { show: false } }
      ],
      series: [
        { label: "day", value: function (u, v) { return v == null ? "" : data.days[v]; } },
        { label: "cost", stroke: "#0b5cad", fill: "rgba(11,92,173,0.25)", paths: uPlot.paths.bars({ size: [0.6, 40] }) },
        { label: "requests", scale: "req", stroke: "#1a7f37", width: 2 }
      ]
    }, [xs, cost, data.requests], chartEl);
  }

  // Playground: chat through the console's session (streamed), image jobs.
  function show(id, text) { document.getElementById(id).textContent = text; }
  var shownHeaders = ["x-request-id", "x-deployment-id", "x-model-used", "x-backend",
    "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "x-ratelimit-tier",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "retry-after", "location"];
  function headersOf(resp) {
    var lines = ["HTTP " + resp.status];
    shownHeaders.forEach(function (h) { var v = resp.headers.get(h); if (v !== null) lines.push(h + ": " + v); });
    return lines.join("\n");
  }
  function showCost(resp) {
    var rid = resp.headers.get("x-request-id");
    if (!rid) return;
    fetch(base + "/playground/usage/" + encodeURIComponent(rid), { credentials: "same-origin" })
      .then(function (r) { return r.json(); })
      .then(function (u) {
        if (u.error) { show("pg-cost", u.error.message); return; }
        show("pg-cost", "cost: " + (u.cost / 1e6).toFixed(6) + " units (" + u.cost + " micro-units)\n" +
          "tokens: " + u.input_tokens + " in, " + u.output_tokens + " out\nwait/run/total ms: " +
          u.wait_ms + " / " + u.run_ms + " / " + u.total_ms + "\nstatus: " + u.status);
      });
  }
  function post(path, body) {
    show("pg-req", "POST /v1" + path + "\n" + JSON.stringify(body, null, 2));
    show("pg-out", ""); show("pg-headers", "waiting..."); show("pg-cost", "");
    return fetch(base + "/playground" + path.replace("/chat/completions", "/chat").replace("/inference/image", "/image"), {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body)
    });
  }
  var chatForm = document.getElementById("chat-form");
  if (chatForm) {
    chatForm.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var stream = document.getElementById("pg-stream").checked;
      var body = { model: chatForm.model.value, messages: [{ role: "user", content: chatForm.message.value }],
                   max_tokens: parseInt(chatForm.max_tokens.value, 10) || 32, stream: stream };
      post("/chat/completions", body).then(function (resp) {
        show("pg-headers", headersOf(resp));
        if (!stream || !resp.ok || !resp.body) {
          return resp.json().then(function (j) {
            show("pg-out", j.choices ? j.choices[0].message.content : JSON.stringify(j, null, 2));
            showCost(resp);
          });
        }
        var reader = resp.body.getReader(), decoder = new TextDecoder(), buf = "", out = "";
        function pump() {
          return reader.read().then(function (r) {
            if (r.done) { showCost(resp); return; }
            buf += decoder.decode(r.value, { stream: true });
            var parts = buf.split("\n\n"); buf = parts.pop();
            parts.forEach(function (ev) {
              var line = ev.replace(/^data: ?/, "");
              if (!line || line === "[DONE]") return;
              try {
                var j = JSON.parse(line);
                if (j.error) { out += "\n[error] " + j.error.message; }
                else if (j.choices && j.choices[0] && j.choices[0].delta && j.choices[0].delta.content) { out += j.choices[0].delta.content; }
              } catch (e) { /* not JSON */ }
            });
            show("pg-out", out);
            return pump();
          });
        }
        return pump();
      }).catch(function (e) { show("pg-out", "request failed: " + e); });
    });
  }
  var imageForm = document.getElementById("image-form");
  if (imageForm) {
    imageForm.addEventListener("submit", function (ev) {
      ev.preventDefault();
      post("/inference/image", { model: imageForm.model.value, prompt: imageForm.prompt.value })
        .then(function (resp) {
          show("pg-headers", headersOf(resp));
          return resp.json().then(function (j) {
            show("pg-out", JSON.stringify(j, null, 2) + (j.job_id ? "\n\nSee it on the Jobs page." : ""));
          });
        });
    });
  }
})();
