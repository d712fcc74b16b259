"""The bench: our engines against Captum and the forward-pass roofline, on the same images.

Owns: the ``bench`` command (``main``), timing the engines side by side (``engines``), the
networks it times (``nets``) and a whole audit against a Captum script (``end_to_end``). Each
row computes with the settings a worker would use.

May import: every layer below it (``config``, ``data``, ``kernel``, ``incremental``, ``models``,
``run``, ``storage``, ``schema``).
"""
