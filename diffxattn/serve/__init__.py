"""`diffxattn serve`: a local web app to generate, look inside (per-word heatmaps) and edit, live.

    diffxattn serve [--pipeline DIR] [--host 127.0.0.1] [--port 7860]

request.py   what one run asks for, checked, and the command line that reproduces it
queue.py     one worker, newest run wins: superseded and cancelled runs stop at their next step
runs.py      what a run computes (image, maps, downloads) with the pipeline
page.py      the page: the heatmap viewer's pieces plus the prompt, weight and edit controls
app.py       the HTTP app (Starlette): routes, streamed progress, Origin/Host checks; `serve`

Importing this package loads no torch: the model loads in a background thread after the server is up.
"""
