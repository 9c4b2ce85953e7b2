"""The Streamlit app's services: everything the pages compute, cache and draw. Streamlit, Plotly and pandas
are imported here and nowhere else in cbnorm; the library (``cbnorm`` outside this package) never imports
this package, so ``pip install cbnorm`` without the app's extra still imports every library module.

Layout (app.py and pages/*.py, at the repository root, hold only widgets and plots and call these):

* ``shared``: what every page uses: runs directory (the sidebar's choice, ``$CBNORM_RUNS``; runs in nested
  folders), benchmark results (``bench_dir``, ``$CBNORM_BENCH``) and loaded runs (``get_run``, ``inventory``,
  ``run_by_name``), the sidebar selection and layer choices (``selection``, ``layer_choices``,
  ``layer_label``, ``layer_info``: from the module, or from the recorded description), following a run
  being written (``follow_toggle``, ``step_picker``, ``refresh``), the device, the error guard (``guard``)
  and page frame (``page_setup``), the caches' byte budgets (``BUDGET_MB``, ``BUDGETS``), the heap janitor,
  ``clear_caches`` and the CSV download buttons.
* ``source``: the one activation source of every page: a layer's input, x_hat and output at a step, read
  from the run's recorded summary, or computed by the rebuilt model on test images (``activations``).
* ``activations``: the shared test sets, seeded minibatches and forward hooks on a layer, for ``source``.
* ``histograms`` (page 1), ``evolution`` (page 2), ``daynight`` (page 3), ``compare`` (page 4, with the
  seed groups, the MN-paper reproduction and the benchmark results' plot data), ``generation`` (page 5, the
  GAN runs), ``training`` (page 6, across runs and training): one service module per page.
* ``figures`` and ``figures_training`` (page 6's): the Plotly figure builders, and ``figure_frame`` /
  ``frame_csv`` for the downloads.

Importing this package imports nothing heavy; import the module you need (``from cbnorm.app import shared``).
"""
