"""The archive: kept copies of messages, searchable, exportable, backed up
(popbox.archive.base has the plug-in point and its rules)."""
