"""The web console: the chat page (platform "web"), /metrics, /healthz and /readyz.

``server.py`` builds the aiohttp application and runs it as one of the app's adapters;
``chat.py`` is the chat page, ``port.py`` the `ChatPort` behind it, ``identity.py`` the
signed visitor cookie and CSRF token, ``uploads.py`` the bounded form reader, ``tasks.py``
the capped background dialog calls, ``ops.py`` the operators' routes. Pages are Jinja2
templates in ``templates/``; ``static/`` holds the page's own CSS and JavaScript (nothing
is fetched from elsewhere). The admin console goes beside them: ``admin.py`` with its
routes, templates under ``templates/admin/``.
"""

from bot.adapters.web.server import WebAdapter

__all__ = ["WebAdapter"]
