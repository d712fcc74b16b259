"""The bench: our engines against Captum and the forward-pass roofline, on the same images.

Owns: the ``bench`` command (``main``), timing the engines side by side (``engines``) and the
networks it times (``nets``). Each row computes with the settings a worker would use.

May import: every layer below it (``kernel``, ``incremental``, ``models``, ``run``, ``config``).
"""
