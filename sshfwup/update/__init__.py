"""One update, in the order the bytes flow: the device lock (``lock``), what the upload says it is
(``fwhead``), the held-back tail (``holdback``), fwup itself (``fwup``), the uploader's text
(``report``), the update as a whole (``update``), the default success callback (``pipeline``),
its journal (``journal``) and the records of installed firmware (``installed``). Knows nothing of
SSH: a transport feeds an :class:`~sshfwup.update.update.Update` and reads its outcome.
"""
