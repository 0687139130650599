"""Analysis of why CEDNet detects better (CEDNet, arXiv 2302.06052, appendix B).

Framework-free building blocks (torch, torchvision, numpy, matplotlib only):

- :mod:`~cednet_pl.analysis.quality`: per-image detection-quality scores and their JSON file.
- :mod:`~cednet_pl.analysis.regions`: input-gradient maps and important-region area curves.
- :mod:`~cednet_pl.analysis.selection`: top-K images where model A beats model B, image lists.
- :mod:`~cednet_pl.analysis.plots`: Figure A2 (area curves) and Figure A1 (panels).
- :mod:`~cednet_pl.analysis.compare`: the ``cednet-compare`` command that chains them.
"""
