"""`noisecraft ui`: a local web UI (Gradio) over the one pipeline API.

    app.py       the Gradio Blocks: Create (generate, edit), Watch and learn, Train
    library.py   which models the UI may open: runs, diffusers folders and single files under --models, nothing else
    engine.py    one generation at a time on a worker thread: live x̂0 previews, progress, Cancel within one step,
                 PNGs with their parameters on disk and small thumbnails for the gallery (no Gradio in here)
    learn.py     the "watch and learn" pictures (learn_tab.py lays them out)    training.py   the training subprocess

Gradio is an optional extra (`pip install -e ".[ui]"`); nothing outside this package imports it.
"""
