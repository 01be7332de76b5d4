// autonomy sign-in: posts the credential as JSON to /login (the server refuses any
// other content type for a change), which answers a session cookie (HttpOnly,
// SameSite=Strict); then the panel loads. No inline script: the CSP allows none.
(function () {
  "use strict";
  var form = document.getElementById("login");
  var input = document.getElementById("token");
  var error = document.getElementById("login-error");
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    error.hidden = true;
    fetch("/login", { method: "POST", headers: { "Content-Type": "application/json" },
                      body: JSON.stringify({ token: input.value.trim() }),
                      credentials: "same-origin" })
      .then(function (resp) {
        return resp.json().then(function (answer) {
          if (answer.ok) { window.location.assign("/"); return; }
          error.textContent = (answer.error || "error") + ": " + (answer.message || "");
          error.hidden = false;
        });
      })
      .catch(function (err) {
        error.textContent = "cannot reach the server: " + err.message;
        error.hidden = false;
      });
  });
})();
