"""The field view: a static web page over the site's retained MQTT topics.

`SITE` is the directory Mosquitto's WebSockets listener serves (`http_dir`):
`index.html`, `app.js`, `style.css` and `vendor/mqtt.min.js` (the MQTT client's
browser build from npm, pinned by `package-lock.json` beside this file and
rebuilt by `build.sh`). Nothing here runs in Python; see docs/broker.md.
"""

from pathlib import Path

__all__ = ["SITE"]

SITE = Path(__file__).resolve().parent / "site"
"""The directory of the page, as installed."""
