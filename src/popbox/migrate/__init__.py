"""``popbox import``: take over mail and its UIDLs from the server popbox replaces.

Clients that leave mail on the server remember each message's UIDL; if the UIDLs
change, they download the whole mailbox again. The sources here read what the old
server showed (Dovecot's ``dovecot-uidlist`` and ``pop3_uidl_format``, Courier's
``courierpop3dsizelist``, X-UIDL headers, or a live POP3 login), ``plan`` decides each
message before anything is written, and ``apply`` and ``live`` carry the plan out on
popbox's store, resumably. docs/migration.md is the operator's guide.
"""
