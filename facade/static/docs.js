// Swagger UI over this server's own /openapi.json (the bundle is served from the
// swagger-ui-py package, not a CDN).
"use strict";
window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
