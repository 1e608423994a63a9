"""Goodput of PD configurations on real traces, measured on the CPU testbed (issue 7).

Data flow of ``python -m eval.goodput`` (one module per step):

1. ``workload``  trace window (``eval/sim/trace.py``) -> lengths scaled, arrivals re-timed per rate
2. ``prompts``   real text (ShareGPT package, else OS text) -> token ids of exactly those lengths
3. ``runner``    per configuration (``eval/pd_configs.py``): a ``PDCluster`` on the shaped link;
                 stock first: unloaded calibration -> SLOs; then the rate search, one run per rate
4. ``client``    one run: SGLang ``bench_serving``'s request function at trace timestamps, early stop
5. ``metrics``   TTFT/TPOT, SLO attainment, goodput (DistServe), the search's next rate
6. ``prices``    goodput per dollar (``prices.json``, else the simulator's GPU table)
7. ``report``    flat JSON, markdown summary, PNG plots; ``plan`` prints the time estimate first
8. ``confidence`` several windows per trace (``--windows``, ``--windows-from``; ``windows`` plans the
                 runs and draws the result): ratio per window, bootstrap 90 % interval per trace and overall
"""
