// autonomy control panel: keeps the server-rendered page fresh and wires the Resume
// buttons. Plain JS, no build step. The page's sections come from /panel/sections (the
// same template as the first paint); only the sections whose HTML changed are swapped,
// so a tooltip under the pointer survives a refresh that changed nothing there.
(function () {
  "use strict";

  var TOKEN_KEY = "autonomy.apiToken";
  var body = document.body;
  var authRequired = body.dataset.authRequired === "true";
  var refreshMs = Math.max(500, parseInt(body.dataset.refreshMs, 10) || 3000);
  var sections = document.getElementById("sections");
  var liveDot = document.getElementById("live-dot");
  var liveText = document.getElementById("live-text");
  var flash = document.getElementById("flash");
  var timer = null;
  var inFlight = false;

  function say(text, bad) {
    flash.textContent = text;
    flash.classList.toggle("bad", !!bad);
    flash.hidden = false;
    clearTimeout(say.t);
    say.t = setTimeout(function () { flash.hidden = true; }, bad ? 8000 : 4000);
  }

  function hhmmss(d) {
    return d.toISOString().slice(11, 19);
  }

  function swap(html) {
    var fresh = document.createElement("div");
    fresh.innerHTML = html;
    var next = fresh.querySelectorAll("[data-section]");
    var current = sections.querySelectorAll("[data-section]");
    var same = next.length === current.length;
    for (var i = 0; same && i < next.length; i++) {
      same = next[i].dataset.section === current[i].dataset.section;
    }
    if (!same) {  // the set of sections changed (an error came or went): swap it all
      sections.innerHTML = fresh.innerHTML;
      return;
    }
    for (var j = 0; j < next.length; j++) {
      if (next[j].innerHTML !== current[j].innerHTML) {
        current[j].replaceWith(next[j]);
      }
    }
  }

  function refresh() {
    if (inFlight) { return Promise.resolve(); }
    inFlight = true;
    // the task list's filters (?status=dead&assignee=...) ride along with the refresh
    return fetch("/panel/sections" + window.location.search,
                 { headers: { Accept: "text/html" }, cache: "no-store" })
      .then(function (resp) {
        return resp.text().then(function (html) {
          swap(html);
          var ok = resp.ok;
          liveDot.className = "dot " + (ok ? "ok" : "down");
          liveText.textContent = (ok ? "updated " : "degraded ") + hhmmss(new Date()) + " UTC";
        });
      })
      .catch(function () {
        liveDot.className = "dot down";
        liveText.textContent = "server unreachable since " + hhmmss(new Date()) + " UTC";
      })
      .then(function () { inFlight = false; });
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(function () { refresh().then(schedule); }, refreshMs);
  }

  function askToken(why) {
    var t = window.prompt(why + "\nAPI token (AUTONOMY_API_TOKEN), kept for this tab only:");
    if (t && t.trim()) {
      sessionStorage.setItem(TOKEN_KEY, t.trim());
      return t.trim();
    }
    return null;
  }

  function post(request, token) {
    var headers = { "Content-Type": "application/json" };
    if (token) { headers.Authorization = "Bearer " + token; }
    return fetch("/api/autonomy", { method: "POST", headers: headers,
                                    body: JSON.stringify(request) });
  }

  // A mutating action: asks for the token once when the server needs one, and again
  // only if the server refuses the one it has.
  function act(request) {
    var token = sessionStorage.getItem(TOKEN_KEY);
    if (authRequired && !token) {
      token = askToken("This server needs its API token for changes.");
      if (!token) { return Promise.reject(new Error("no API token given")); }
    }
    return post(request, token).then(function (resp) {
      if (resp.status !== 401 && resp.status !== 403) { return resp; }
      sessionStorage.removeItem(TOKEN_KEY);
      var again = askToken("The server refused that token.");
      if (!again) { return resp; }
      return post(request, again);
    }).then(function (resp) {
      return resp.json().catch(function () { return { ok: false, error: "http_" + resp.status,
                                                       message: resp.statusText }; });
    }).then(function (answer) {
      if (!answer.ok) {
        throw new Error((answer.error || "error") + ": " + (answer.message || ""));
      }
      return answer;
    });
  }

  sections.addEventListener("click", function (ev) {
    var button = ev.target.closest("button.resume, button.pause");
    if (!button) { return; }
    var lane = button.dataset.assignee;
    var pause = button.classList.contains("pause");
    var verb = pause ? "pause" : "resume";
    button.disabled = true;
    act({ action: pause ? "pause_lane" : "resume_lane", assignee: lane, actor: "panel",
          reason: (pause ? "paused" : "resumed") + " from the control panel" })
      .then(function () { say("Lane " + lane + " " + verb + "d."); })
      .catch(function (err) { say("Could not " + verb + " " + lane + ": " + err.message, true); })
      .then(function () { button.disabled = false; return refresh(); })
      .then(schedule);
  });

  sections.addEventListener("click", function (ev) {
    var button = ev.target.closest("button.requeue");
    if (!button) { return; }
    var id = Number(button.dataset.task);
    button.disabled = true;
    act({ action: "requeue", taskId: id, actor: "panel" })
      .then(function () { say("Task " + id + " requeued."); })
      .catch(function (err) { say("Could not requeue task " + id + ": " + err.message, true); })
      .then(function () { button.disabled = false; return refresh(); })
      .then(schedule);
  });

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) { refresh().then(schedule); }
  });

  schedule();
})();
