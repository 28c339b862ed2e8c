"""`lmtune webui`: the training page. app.py lays out the page; runs.py starts, stops and watches
the `lmtune` subprocesses it runs (testable without a browser); form.py maps the form to config values."""
