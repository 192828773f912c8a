"""`minisd explore`: watch the model think, live in a browser, on a laptop CPU.

    minisd explore [--model MODEL] [--port 7860] [--host 127.0.0.1]

then open the printed address. The page has three panels:

- Text to image: prompt (and a negative prompt where the pipeline takes one), seed, steps,
  guidance scale w, scheduler. As sampling runs, every step shows x_t decoded, the
  predicted noise epsilon (the 4 latent channels) and the predicted x_0; afterwards a
  slider scrubs through the steps, with each prompt token's cross-attention over the
  latent grid at the chosen step.
- Forward noising: a shapes image or one of yours, and a slider for t showing x_t,
  alpha_bar_t and the signal-to-noise ratio, in pixels and in the latent.
- Guidance: one seed at several guidance scales side by side.

The server is Python's own http.server streaming Server-Sent Events to one static page
(minisd/explore/page.html); it needs nothing beyond minisd itself (README: why not gradio).
The computation is in app.py, the HTTP in server.py, the command in minisd/cli/explore.py.
"""
