// Swagger UI for /api/docs (server/openapi.py). A file of its own, not an inline
// script: the app's Content-Security-Policy allows scripts from this origin only.
(function () {
  "use strict";

  var root = document.getElementById("swagger-ui");
  var meta = document.querySelector('meta[name="csrf-token"]');
  var csrfToken = meta ? meta.getAttribute("content") : "";

  function sameOrigin(url) {
    try {
      return new URL(url, window.location.href).origin === window.location.origin;
    } catch (e) {
      return false;
    }
  }

  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-document-url"),
    domNode: root,
    deepLinking: true,
    // No badge fetched from validator.swagger.io: the page works offline (and the
    // policy's connect-src 'self' would block it anyway).
    validatorUrl: null,
    // Try-it-out rides on the login session; a session-authenticated write needs the
    // page's CSRF token (server/auth.py). Only sent to this origin, never elsewhere.
    requestInterceptor: function (request) {
      if (csrfToken && sameOrigin(request.url)) {
        request.headers["X-CSRFToken"] = csrfToken;
      }
      return request;
    },
  });
})();
