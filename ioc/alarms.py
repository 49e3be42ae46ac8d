"""The EPICS alarm severities and statuses the twin sets (the numbers of EPICS base's ``alarm.h``).

Here rather than from softioc, so that the parts of the IOC import without loading an IOC database.
"""

NO_ALARM = 0  # a severity and a status

MINOR_ALARM, MAJOR_ALARM, INVALID_ALARM = 1, 2, 3  # severities

READ_ALARM, WRITE_ALARM, STATE_ALARM, COMM_ALARM, UDF_ALARM = 1, 2, 7, 9, 17  # statuses
