"""The delivery edge: message templates and the adapters that hand messages to providers.

Nothing here decides *whether* to send; the service layer does. This package only turns a
code or a security notice into words (``templates``), and words into an email, SMS or voice
call (``senders``), classifying every failure as retryable or not (``messages``).
"""
