"""Reference portal and backoffice for mfa-service.

Two server-rendered web apps (Starlette) that share one central login cookie and call
mfa.v1.TwoFactorService only through the client distribution (``mfa.v1`` stubs and
``mfa_client``): the portal has the password login, the 2FA step and the profile page; the
backoffice honours a 2FA session passed on the portal. ``python -m portal_backoffice`` starts
the service, both apps and a demo inbox (see ``launcher``).
"""
