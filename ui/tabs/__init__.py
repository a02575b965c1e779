"""One module per tab; each has `build(ctx)`, called inside the app's `gr.Tabs()`."""
